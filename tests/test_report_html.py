"""report.html of the sweep report: self-contained (checked by parsing) and rendered by a real headless Chromium.

The browser comes from scripts/install_chromium.sh (Debian's ``chromium``, installed with apt-get on first use).
Without one the browser test is skipped, and fails under CI (``CI=true``). No training is run: the sweep is the
fake multirun of tests/test_report.py plus generated pictures.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from attent_vision.tools import report
from tests.test_report import make_job

ROOT = Path(__file__).resolve().parents[1]
HARD = "0_selection=hard,ratio=cosine,interval=incremental"
SOFT = "1_selection=soft,ratio=incremental,interval=incremental"
FAILED = "5_selection=soft,ratio=incremental,interval=fixed"
BASELINE = "10_selection=none,ratio=incremental,interval=incremental"
# Every embedded picture gets its own size, so the page's images can be told apart by their natural size.
PICTURES = {
    f"{HARD}/selection.png": (300, 200),
    f"{HARD}/selection_gallery/epoch_002.png": (310, 90),
    f"{HARD}/selection_gallery/epoch_010.png": (320, 100),  # the latest: the one shown
    f"{HARD}/reconstructions/epoch_009.png": (330, 150),
    f"{BASELINE}/reconstructions/epoch_009.png": (340, 160),
    f"{FAILED}/reconstructions/epoch_000.png": (350, 170),
}


def write_png(path: Path, size: tuple[int, int], seed: int) -> None:
    """A striped picture (several colours, so a blank render is detectable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, (255, 255, 255))
    for x in range(0, size[0], 10):
        colour = ((37 * (x + seed)) % 256, (91 * x) % 256, (53 * seed + x) % 256)
        image.paste(colour, (x, 0, min(x + 5, size[0]), size[1]))
    image.save(path)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("html") / "multirun"
    make_job(root, 0, "hard", "cosine", "incremental", wall=90, samples=13000, val=2.2)
    make_job(root, 1, "soft", "incremental", "incremental", seed=0, wall=90, samples=13500, val=2.3)
    make_job(root, 2, "soft", "incremental", "incremental", seed=1, wall=94, samples=13500, val=2.5)
    make_job(root, 3, "soft", "cosine", "fixed", wall=80, samples=15000, val=2.4)
    make_job(root, 4, "random", "cosine", "incremental", wall=70, samples=13000, val=2.9)
    make_job(root, 5, "soft", "incremental", "fixed", status="failed")
    make_job(root, 6, "hard", "incremental", "fixed", write_summary=False)
    make_job(root, 10, "none", wall=100, samples=20000, val=2.5)
    for seed, (name, size) in enumerate(PICTURES.items()):
        write_png(root / name, size, seed)
    assert report.main([str(root)]) == 0
    return root


class PageParser(HTMLParser):
    """Collects tags, attributes and text of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(page: str) -> PageParser:
    parser = PageParser()
    parser.feed(page)
    return parser


def png_size(uri: str) -> tuple[int, int]:
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix), uri[:60]
    with Image.open(io.BytesIO(base64.b64decode(uri[len(prefix) :], validate=True))) as image:
        return image.size


def expected_sizes(sweep: Path) -> list[tuple[int, int]]:
    """Natural sizes of the page's images in page order: the two sweep plots, then each job's pictures."""
    plots = [Image.open(sweep / name).size for name in ("report.png", "report_curves.png")]
    # Jobs in table order (baseline, random, soft, soft x2, hard), then the unfinished ones.
    by_job = [
        PICTURES[f"{BASELINE}/reconstructions/epoch_009.png"],
        *(PICTURES[f"{HARD}/{n}"] for n in ("selection.png", "selection_gallery/epoch_010.png")),
        PICTURES[f"{HARD}/reconstructions/epoch_009.png"],
        PICTURES[f"{FAILED}/reconstructions/epoch_000.png"],
    ]
    return plots + by_job


# ---------------------------------------------------------------------------------------------------------------
# the file itself


def test_report_html_is_self_contained(sweep: Path) -> None:
    page = (sweep / "report.html").read_text()
    parsed = parse(page)
    tags = [t for t, _ in parsed.tags]
    assert "script" not in tags and "link" not in tags and "iframe" not in tags
    for _, attrs in parsed.tags:  # nothing outside the file: inline images, in-page anchors only
        assert attrs.get("src", "data:").startswith("data:")
        assert attrs.get("href", "#").startswith("#")
    images = [attrs["src"] for tag, attrs in parsed.tags if tag == "img"]
    assert [png_size(src) for src in images] == expected_sizes(sweep)
    rows = [attrs for tag, attrs in parsed.tags if tag == "tr" and "data-selection" in attrs]
    assert [r["data-selection"] for r in rows] == ["none", "random", "soft", "soft", "hard"]
    assert rows[0].get("class") == "baseline" and rows[0]["data-ratio"] == "–"
    failed = page.split('id="failed"', 1)[1]
    assert "RuntimeError: CUDA out of memory" in failed and "ConfigError: too few epochs" in failed
    assert FAILED in failed and "6_selection=hard,ratio=incremental,interval=fixed" in failed
    assert "<strong>2.200</strong>" in page  # the lowest final val loss, as in report.md


def test_loss_curve_adds_scoring_time_from_selection_jsonl(tmp_path: Path) -> None:
    job_dir = make_job(tmp_path, 0, "hard")
    summary = json.loads((job_dir / "summary.json").read_text())
    summary["history"] = [
        {"epoch": 0, "train_time_s": 10.0, "val_time_s": 1.0, "val_loss": 5.0},
        {"epoch": 1, "train_time_s": 8.0, "val_time_s": 1.0, "val_loss": 4.0},
        {"epoch": 2, "train_time_s": 8.0},  # no validation this epoch: no point, but its time counts
        {"epoch": 3, "train_time_s": 8.0, "val_time_s": 1.0, "val_loss": 3.5},
    ]
    (job_dir / "summary.json").write_text(json.dumps(summary))
    events = [{"epoch": 1, "scoring_time_s": 2.0}, {"epoch": 3, "scoring_time_s": 3.0}]
    (job_dir / "selection.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events) + "{truncated")
    times, losses = report.loss_curve(report.load_job(job_dir))
    assert times == [0.0, 11.0, 22.0, 42.0]
    assert losses == [10.6, 5.0, 4.0, 3.5]  # the initial validation loss first


# ---------------------------------------------------------------------------------------------------------------
# in a real browser


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"headless chromium unavailable under CI: {reason}")
    pytest.skip(f"headless chromium unavailable: {reason}")


@pytest.fixture(scope="module")
def browser() -> str:
    """Path of a Chromium binary (installed with apt-get on first use)."""
    script = ROOT / "scripts" / "install_chromium.sh"
    try:
        proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        _unavailable("scripts/install_chromium.sh timed out")
    if proc.returncode != 0:
        _unavailable(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}")
    return proc.stdout.strip().splitlines()[-1]


def chromium(browser: str, profile: Path, *args: str) -> str:
    """Runs headless Chromium with the given arguments; returns its stdout (e.g. the dumped DOM)."""
    command = [
        browser,
        "--headless",
        "--no-sandbox",  # tests run as root in containers, where the sandbox cannot start
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
        *args,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc.stdout


# Injected into a copy of the page only: it writes what the browser made of each image into the DOM.
IMAGE_PROBE = """<script>
window.addEventListener("load", () => {
  const probe = document.createElement("pre");
  probe.id = "image-probe";
  probe.textContent = JSON.stringify(Array.from(document.images, (img) =>
    [img.complete, img.naturalWidth, img.naturalHeight, img.getBoundingClientRect().width]));
  document.body.appendChild(probe);
});
</script>"""


@pytest.mark.xdist_group("system")  # beside the SLURM tests: one worker for system packages and fixed ports
def test_report_html_renders_in_headless_chromium(sweep: Path, browser: str, tmp_path: Path) -> None:
    probe_page = tmp_path / "probe.html"
    probe_page.write_text((sweep / "report.html").read_text().replace("</body>", IMAGE_PROBE + "</body>"))
    dom = chromium(
        browser, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom", probe_page.as_uri()
    )
    parsed = parse(dom)
    rows = [attrs for tag, attrs in parsed.tags if tag == "tr" and "data-selection" in attrs]
    assert [(r["data-selection"], r["data-ratio"], r["data-interval"]) for r in rows] == [
        ("none", "–", "–"),
        ("random", "cosine", "incremental"),
        ("soft", "cosine", "fixed"),
        ("soft", "incremental", "incremental"),
        ("hard", "cosine", "incremental"),
    ]
    text = " ".join(" ".join(parsed.text).split())
    assert (
        "– (full data)" in text and "92 ± 3 s (−8.0%)" in text and "RuntimeError: CUDA out of memory" in text
    )
    found = re.search(r'<pre id="image-probe">(.*?)</pre>', dom, re.S)
    assert found, "the probe did not run: the page's load event never fired"
    images = json.loads(found.group(1).replace("&quot;", '"'))
    assert all(complete and shown > 0 for complete, _, _, shown in images), images
    assert [(w, h) for _, w, h, _ in images] == expected_sizes(sweep)  # every data: URI decoded

    shot = tmp_path / "report_screenshot.png"
    chromium(
        browser,
        tmp_path / "profile",
        f"--screenshot={shot}",
        "--window-size=1280,2000",
        sweep.joinpath("report.html").as_uri(),
    )
    with Image.open(shot) as image:
        assert image.size == (1280, 2000)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 100  # text, table and plots, not a blank page
    assert max(count for count, _ in colours) < 0.9 * 1280 * 2000
    if os.environ.get("ATTENT_KEEP_SCREENSHOT"):  # for looking at it: ATTENT_KEEP_SCREENSHOT=/some/dir
        shutil.copy(shot, Path(os.environ["ATTENT_KEEP_SCREENSHOT"]) / shot.name)
