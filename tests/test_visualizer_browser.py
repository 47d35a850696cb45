"""The `fxadapt inspect` HTML page in a real headless Chromium (Debian's `chromium`, driven by playwright).

Needs `apt-get install chromium` and `pip install playwright` (never `playwright install`: the page is
checked in the system Chromium). Without them these tests skip and say why. Set
FXADAPT_SCREENSHOT=docs/visualizer-diff.png to refresh the documentation screenshot.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from test_visualizer import build_stages

from fxadapt.tools.render import render

CHROMIUM = os.environ.get("FXADAPT_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Modules open in the documentation screenshot: layer 0's attention down to the adapted query.
SHOT_EXPAND = ["g:encoder", "g:encoder.layer.0", "g:encoder.layer.0.attention", "g:encoder.layer.0.attention.self",
               "g:encoder.layer.0.attention.self.query", "g:encoder.layer.0.output",
               "g:encoder.layer.0.output.LayerNorm"]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed "
                                   "(pip install playwright); the HTML viewer was not checked in a browser")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium); the HTML viewer was not checked")
    profile = tempfile.mkdtemp(prefix="fxadapt-chromium-")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=ARGS, viewport={"width": 1500, "height": 950})
        yield context
        context.close()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def page_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("inspect") / "graph.html"
    path.write_text(render(build_stages(), "html"))
    return path


class Page:
    """A page of the viewer plus every console error, page error and non-file request it caused."""

    def __init__(self, context, url: str) -> None:
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.page = context.new_page()
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: None if r.url.startswith(("file:", "data:", "about:"))
                     else self.requests.append(r.url))
        self.page.goto(url)
        self.page.wait_for_function("window.fxadapt !== undefined")

    def has(self, item: str) -> bool:
        return self.page.locator(f'#viewport [data-id="{item}"]').count() == 1

    def click(self, item: str) -> None:
        self.page.locator(f'#viewport [data-id="{item}"] > rect').first.click()

    def close(self) -> None:
        assert self.errors == [], self.errors
        assert self.requests == [], f"the page tried to reach the network: {self.requests}"
        self.page.close()


def test_page_loads_collapsed_without_errors(browser, page_file):
    page = Page(browser, page_file.as_uri())
    for top in ("g:embeddings", "g:encoder", "g:pooler", "n:input_ids", "n:output"):
        assert page.has(top), top
    assert not page.has("g:encoder.layer.0")  # collapsed: only the model's own level is drawn
    assert int(page.page.evaluate("document.body.dataset.items")) < 12
    assert page.page.locator("#stages button.active").inner_text() == "optimized"
    page.close()


def test_expanding_a_layer_shows_its_modules(browser, page_file):
    page = Page(browser, page_file.as_uri())
    page.click("g:encoder")
    assert page.has("g:encoder.layer.0") and page.has("g:encoder.layer.1")
    page.click("g:encoder.layer.0")
    for child in ("attention", "intermediate", "output"):
        assert page.has(f"g:encoder.layer.0.{child}")
    assert "encoder.layer.0" in page.page.locator("#details h3").inner_text()
    assert "expand=" in page.page.evaluate("location.hash")
    page.page.locator('#viewport [data-id="g:encoder.layer.0"] .toggle').click()  # collapse again
    assert not page.has("g:encoder.layer.0.attention")
    page.close()


def test_search_finds_and_reveals_an_adapter_node(browser, page_file):
    page = Page(browser, page_file.as_uri())
    page.page.locator('#stages button[data-stage="1"]').click()  # LoRA nodes exist until merge_lora
    page.page.locator("#search").fill("fxadapt_a_l0_attn")
    hits = page.page.locator("#results a")
    assert hits.count() == 2  # q and v of layer 0
    hits.filter(has_text="fxadapt_a_l0_attn_q").click()
    assert page.has("n:fxadapt_a_l0_attn_q")
    node = page.page.locator('#viewport [data-id="n:fxadapt_a_l0_attn_q"]')
    assert "adapter" in node.get_attribute("class") and "selected" in node.get_attribute("class")
    details = page.page.locator("#details").inner_text()
    for expected in ("call_module", "fxadapt.a.L0_attn_q", "a · lora", "insert_adapters", "attn.q",
                     "lora_A", "[4, 32]", "lora_B", "[32, 4]", "encoder.layer.0.attention.self.query"):
        assert expected in details, expected
    page.close()


def test_diff_mode_marks_removed_and_merged_nodes(browser, page_file):
    page = Page(browser, page_file.as_uri() + "#stage=2&base=1")
    assert page.page.locator("#diff").is_checked()
    changes = page.page.locator("#changes").inner_text()
    assert "Removed 12" in changes.replace("\n", " ") and "Merged 4" in changes.replace("\n", " ")
    page.page.locator("#changes a", has_text="fxadapt_a_l0_attn_q").click()
    assert "removed" in page.page.locator('#viewport [data-id="n:fxadapt_a_l0_attn_q"]').get_attribute("class")
    page.page.locator("#search").fill("linear_2")
    page.page.keyboard.press("Enter")
    assert "merged" in page.page.locator('#viewport [data-id="n:linear_2"]').get_attribute("class")
    assert "merge_lora" in page.page.locator("#details").inner_text()
    page.close()


def test_diff_screenshot(browser, page_file, tmp_path):
    """Rewritten vs captured with layer 0 open: what docs/visualizer-diff.png shows."""
    page = Page(browser, page_file.as_uri() + "#stage=1&base=0&expand=" + ",".join(SHOT_EXPAND))
    page.page.locator("#search").fill("fxadapt_b_l0")
    page.page.locator("#results a").first.click()
    page.page.locator("#search").fill("")
    page.page.set_viewport_size({"width": 1600, "height": 1200})
    page.page.evaluate("window.fxadapt.zoomTo('g:encoder.layer.0')")
    out = tmp_path / "diff.png"
    page.page.screenshot(path=str(out))
    assert out.stat().st_size > 20_000
    target = os.environ.get("FXADAPT_SCREENSHOT")
    if target:
        shutil.copyfile(out, target)
    page.close()


def test_large_graph_stays_responsive(browser, tmp_path):
    """A 12-layer model with ~1,500 nodes: collapsed at load, and expanding everything stays fast."""
    path = tmp_path / "large.html"
    path.write_text(render([synthetic_stage(layers=12, ops_per_layer=120)], "html"))
    page = Page(browser, path.as_uri())
    assert int(page.page.evaluate("document.body.dataset.items")) < 10
    elapsed = page.page.evaluate("""() => {
        const t = performance.now();
        document.getElementById('expand-all').click();
        return performance.now() - t; }""")
    assert int(page.page.evaluate("document.body.dataset.items")) > 1500
    assert elapsed < 3000, f"expanding everything took {elapsed:.0f} ms"
    page.close()


def synthetic_stage(layers: int, ops_per_layer: int) -> dict:
    """A snapshot-shaped graph of `layers` chained layers, each a few modules deep (no torch needed)."""
    nodes = [{"name": "x", "op": "placeholder", "target": "x", "inputs": [], "module_stack": []}]
    previous = "x"
    for layer in range(layers):
        for i in range(ops_per_layer):
            path = f"encoder.layer.{layer}.{['attention.self', 'attention.output', 'mlp'][i * 3 // ops_per_layer]}"
            parts = path.split(".")
            stack = [["", "M"]] + [[".".join(parts[:k]), "Block"] for k in (1, 3, 4, 5)]
            name = f"op_{layer}_{i}"
            nodes.append({"name": name, "op": "call_function", "target": "aten.add.Tensor",
                          "inputs": [previous] + ([f"op_{layer}_{i - 2}"] if i >= 2 else []), "module_stack": stack})
            previous = name
    nodes.append({"name": "output", "op": "output", "target": "output", "inputs": [previous], "module_stack": []})
    for node in nodes:
        node.update({"args": "", "module": node["module_stack"][-1][0] if node["module_stack"] else "",
                     "module_type": "", "shapes": [[2, 8, 32]], "dtypes": ["float32"], "site": None, "origin": None,
                     "merged": None, "params": None})
    return {"format": "fxadapt.graph", "version": 1, "stage": "captured", "modules": {"": "M"}, "nodes": nodes}
