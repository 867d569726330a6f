"""Renderers of one `Report`: each turns it into text and computes nothing."""

from .html import render_html
from .json import render_json
from .markdown import render_markdown
from .terminal import render_terminal

__all__ = ["render_html", "render_json", "render_markdown", "render_terminal"]
