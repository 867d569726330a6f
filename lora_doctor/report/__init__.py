"""Renderers of one `Report`: each turns it into text and computes nothing."""

from .json import render_json
from .terminal import render_terminal

__all__ = ["render_json", "render_terminal"]
