"""Markdown and HTML renderers on a real report (the #8233 double count), the HTML checked in Chromium.

One CLI run (real vLLM engine, the session's `default_check`) feeds every test. The HTML is opened
in headless Chromium: the rendered DOM must hold the charts with the measured scales, and a
screenshot must show a page.
No Chromium is a failure with install instructions (scripts/ensure-chromium.sh), never a skip.
"""

from __future__ import annotations

import json
import re
import statistics
from html.parser import HTMLParser
from pathlib import Path

import pytest
from browser import dump_dom, require_chromium, screenshot

from lora_doctor.report.html import render_html
from lora_doctor.report.markdown import render_markdown
from lora_doctor.result import Report

MODULES = 14  # tiny-qwen2: 2 layers × 7 LoRA targets
SCALE_TOLERANCE = 0.05  # float32: measured scales are within ~1e-8 of 1 and 2


@pytest.fixture(scope="module")
def report(default_check) -> Report:
    """The default plan (swift-colocate-lora): phase 1 full-merged is ok, phase 2 adapter double counts."""
    run = default_check.run
    assert run.exit_code == 1, f"expected exit 1 (double count), got {run.exit_code}\n{run.stderr[-3000:]}"
    return Report.from_dict(default_check.report)


@pytest.fixture(scope="module")
def html_file(report, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("html") / "report.html"
    path.write_text(render_html(report), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def rendered_dom(html_file) -> str:
    require_chromium()
    return dump_dom(html_file)


def _phase(report: Report, name: str):
    return next(phase for phase in report.phases if phase.name == name)


# ---------------------------------------------------------------------------------------------
# Markdown


def test_markdown_heading_and_verdict(report):
    text = render_markdown(report)
    first = text.splitlines()[0]
    assert first.startswith("### ") and "FAIL" in first and "double_counted" in first
    assert "`double_counted`" in text
    adapter = _phase(report, "adapter")
    assert adapter.explanation.split(":")[0] in text  # the explanation, as the check wrote it
    assert "likely cause" in text and "PR #8275" in text  # CAUSES["double_counted"]


def test_markdown_phase_table_rows(report):
    text = render_markdown(report)
    # Phase rows: "| 1 | `full-merged` | no | ✅ ok | 1.000 | …" (ten or more cells; the layer grid has eight).
    rows = {
        line.split("|")[2].strip(): line
        for line in text.split("**Decode path**")[0].splitlines()  # the decode table's rows are as wide
        if re.match(r"\| \d+ \| `", line) and line.count("|") >= 11
    }
    assert set(rows) == {"`full-merged`", "`adapter`"}
    assert "✅ ok" in rows["`full-merged`"] and "| 1.000 |" in rows["`full-merged`"]
    assert "**double_counted**" in rows["`adapter`"] and "| 2.000 |" in rows["`adapter`"]
    assert "| 100.0% |" in rows["`full-merged`"]


def test_markdown_context_and_layer_grid(report):
    text = render_markdown(report)
    for key in ("python", "torch", "vllm", "transformers", "peft", "device"):
        assert f"{key} `{report.environment[key]}`" in text
    assert f"`{report.checkpoint['path']}`" in text and "| rsLoRA | no |" in text
    assert f"`{report.plan['name']}`" in text
    # The unhealthy phase's grid: a row per layer index, every module bold at 2.000.
    assert "| layer | q_proj | k_proj | v_proj | o_proj | gate_proj | up_proj | down_proj |" in text
    assert re.search(r"^\| 0 \|( \*\*2\.000\*\* \|){7}$", text, re.M)
    assert re.search(r"^\| 1 \|( \*\*2\.000\*\* \|){7}$", text, re.M)
    assert "all 14 LoRA modules hold W0 + ΔW" in text  # the healthy phase: one line
    assert "<details" in text and text.count("<details") == text.count("</details>")
    assert "`min_signal_to_noise` | 16" in text
    assert "the logits resolve the LoRA" in text


def test_markdown_samples_in_code_blocks(report):
    text = render_markdown(report)
    blocks = re.findall(r"^(`{3,})text\n(.*?)\n\1$", text, re.M | re.S)
    contents = [body for _, body in blocks]
    for phase in report.phases:
        for sample in phase.samples:
            assert sample.prompt in contents
            assert sample.reference in contents
            assert sample.engine in contents
    assert any("<think>" in body for body in contents)  # tags survive, unescaped, inside the fences


# ---------------------------------------------------------------------------------------------
# HTML, as a document


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.styles: list[str] = []
        self._in_style = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_style = tag == "style"

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_endtag(self, tag):
        if tag == "style":
            self._in_style = False

    def handle_data(self, data):
        (self.styles if self._in_style else self.text).append(data)


def test_html_is_self_contained(report):
    page = render_html(report)
    parser = _Collect()
    parser.feed(page)
    parser.close()
    linked = [
        (tag, name, value)
        for tag, attrs in parser.tags
        for name, value in attrs.items()
        if name in ("src", "href", "xlink:href", "srcset", "action", "poster", "data") and value
    ]
    assert not [link for link in linked if re.match(r"\s*(https?:)?//", link[2])], linked
    assert not [tag for tag, _ in parser.tags if tag in ("link", "iframe", "img", "object", "embed")]
    scripts = [attrs for tag, attrs in parser.tags if tag == "script"]
    assert all(attrs.get("type") == "application/json" and "src" not in attrs for attrs in scripts)
    css = "".join(parser.styles)
    assert "@import" not in css and "url(" not in css and "@font-face" not in css
    # Text is escaped: the samples' <think> tags are text, not elements.
    assert "think" not in {tag for tag, _ in parser.tags}
    assert any("<think>" in chunk for chunk in parser.text)
    # The embedded report round-trips.
    data = re.search(r'<script type="application/json" id="lora-doctor-report">(.*?)</script>', page, re.S).group(1)
    assert Report.from_dict(json.loads(data)).to_dict() == report.to_dict()


def test_html_content(report):
    page = render_html(report)
    assert page.count('id="layer-scale-chart"') == 1
    for phase in report.phases:
        assert f'id="kl-chart-{phase.index}"' in page
    assert "double_counted" in page and "PR #8275" in page
    for key in ("python", "torch", "vllm", "transformers", "peft", "device"):
        assert f"<dt>{key}</dt>" in page


# ---------------------------------------------------------------------------------------------
# HTML, as Chromium renders it


class _Svg(HTMLParser):
    """The chart's series and circles, and the KL charts, from Chromium's DOM."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.depth = 0
        self.chart_depth: int | None = None
        self.series: dict[str, list[dict[str, str | None]]] = {}
        self.current: str | None = None
        self.series_depth: int | None = None
        self.ids: set[str] = set()
        self.kl_points: dict[str, int] = {}
        self.kl_current: str | None = None
        self.kl_depth: int | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.depth += 1
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "svg" and attrs.get("id") == "layer-scale-chart":
            self.chart_depth = self.depth
        if tag == "svg" and (attrs.get("id") or "").startswith("kl-chart-"):
            self.kl_current, self.kl_depth = attrs["id"], self.depth
            self.kl_points[self.kl_current] = 0
        if self.chart_depth and tag == "g" and "series" in (attrs.get("class") or "").split():
            self.current, self.series_depth = attrs.get("data-phase"), self.depth
            self.series[self.current] = []
        if self.current is not None and tag == "circle":
            self.series[self.current].append(attrs)
        if self.kl_current is not None and tag == "circle":
            self.kl_points[self.kl_current] += 1

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        self.handle_endtag(tag)

    def handle_endtag(self, tag):
        if self.series_depth == self.depth:
            self.current = self.series_depth = None
        if self.chart_depth == self.depth:
            self.chart_depth = None
        if self.kl_depth == self.depth:
            self.kl_current = self.kl_depth = None
        self.depth -= 1


def test_chromium_renders_the_charts(report, rendered_dom):
    assert "<svg" in rendered_dom, rendered_dom[:2000]
    dom = _Svg()
    dom.feed(rendered_dom)
    dom.close()
    assert "layer-scale-chart" in dom.ids
    assert set(dom.series) == {"full-merged", "adapter"}
    adapter = dom.series["adapter"]
    assert len(adapter) == MODULES
    assert all(abs(float(c["data-scale"]) - 2.0) < SCALE_TOLERANCE for c in adapter), adapter
    assert len({c["data-module"] for c in adapter}) == MODULES
    merged = dom.series["full-merged"]
    assert len(merged) == MODULES
    assert all(abs(float(c["data-scale"]) - 1.0) < SCALE_TOLERANCE for c in merged), merged
    # The double count is drawn above the healthy line (SVG y grows downwards).
    assert statistics.mean(float(c["cy"]) for c in adapter) < statistics.mean(float(c["cy"]) for c in merged)
    for phase in report.phases:
        chart = f"kl-chart-{phase.index}"
        assert chart in dom.ids
        assert dom.kl_points[chart] == sum(len(row) for row in phase.kl_per_token)
    assert "&lt;think&gt;" in rendered_dom  # still text after parsing and serialising


def test_chromium_screenshot(html_file, tmp_path):
    require_chromium()
    png = screenshot(html_file, tmp_path / "report.png", width=1280, height=2000)
    assert png.stat().st_size > 20_000, png.stat().st_size
    from PIL import Image

    with Image.open(png) as image:
        assert image.size == (1280, 2000)
        rgb = image.convert("RGB")
        colours = {rgb.getpixel((x, y)) for x in range(0, 1280, 37) for y in range(0, 2000, 41)}
        # The FAIL banner (light red) sits at the top of the page.
        banner = rgb.getpixel((1150, 50))
        scaled = rgb.resize((64, 100))
        distinct = len(scaled.getcolors(maxcolors=64 * 100) or [])
    assert len(colours) > 20, f"screenshot looks blank: {len(colours)} distinct sampled colours"
    assert distinct > 50
    assert banner[0] > banner[1] + 10 and banner[0] > banner[2] + 10, f"no red FAIL banner at the top: {banner}"
