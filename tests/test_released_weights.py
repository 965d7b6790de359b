"""Pretrained weights by name or URL (``pretrained=multimae-b``, ``pretrained=http://...``): downloaded once into
torch.hub's cache with the hash check the file name carries, against a loopback HTTP server (no internet)."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

import pytest
import torch
from omegaconf import OmegaConf

from attent_vision.config import ConfigError
from attent_vision.models import build_multivit, load_pretrained, resolve_checkpoint
from attent_vision.models.checkpoint_keys import multimae_to_timm_vit
from attent_vision.models.released import (
    MIRROR_ENV,
    RELEASED_WEIGHTS,
    WeightsDownloadError,
    release_url,
)
from attent_vision.runs.downstream import resolve_pretrained

from .conftest import FINETUNE_COMMON, FINETUNE_TINY, read_summary, run_finetune, tiny_multimae

LICENCE_LINE = "licence: CC-BY-NC 4.0 (non-commercial)"
LOCAL_HINT = "pass a local file: pretrained=/path/to/file.pth"


def _release_style_bytes(layout: str) -> tuple[bytes, dict[str, torch.Tensor]]:
    """A tiny checkpoint in the release's format: ``{'model': state, 'args': Namespace, 'epoch'}`` with MultiMAE keys
    (rgb + depth + semseg in and out, like the ``multivit`` files) or timm ViT keys with a zero cls row (the ``timm``
    files: the original multimae2vit converts ``ckpt['model']`` in place). Returns the bytes and the MultiMAE state."""
    net = tiny_multimae(extra_norm_pix_loss=False)  # the release has no norm_rgb adapter
    with torch.no_grad():
        net.global_tokens.normal_()
    state = net.state_dict()
    model = state if layout == "multivit" else multimae_to_timm_vit(state)
    buffer = io.BytesIO()
    torch.save(
        {"model": model, "args": argparse.Namespace(model="pretrain_multimae_micro"), "epoch": 1599}, buffer
    )
    return buffer.getvalue(), state


def _hashed_name(stem: str, data: bytes) -> str:
    """A file name carrying the data's sha256 prefix, as torch.hub's HASH_REGEX reads it."""
    return f"{stem}-{hashlib.sha256(data).hexdigest()[:8]}.pth"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torch.hub cache, no mirror, and no proxy between us and the loopback server."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    return tmp_path / "torch" / "hub" / "checkpoints"


@pytest.fixture
def server() -> Iterator[SimpleNamespace]:
    """A loopback HTTP server: ``files`` maps URL paths to bytes, ``requests`` lists the paths asked for."""
    files: dict[str, bytes] = {}
    requests: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(unquote(self.path))
            body = files.get(unquote(self.path))
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield SimpleNamespace(
            url=f"http://127.0.0.1:{httpd.server_address[1]}", files=files, requests=requests
        )
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed on exit: connecting is refused


def _rgb_encoder_keys(model: torch.nn.Module) -> list[str]:
    return [k for k in model.state_dict() if not k.startswith("output_adapters.")]


@pytest.mark.parametrize("layout", ["multivit", "timm"])
def test_url_downloads_once_then_loads_from_the_cache(cache: Path, server, layout: str) -> None:
    data, state = _release_style_bytes(layout)
    name = _hashed_name(f"micro_{layout}", data)
    server.files[f"/weights/{name}"] = data
    url = f"{server.url}/weights/{name}"

    path = resolve_checkpoint(url)
    assert path == cache / name and path.read_bytes() == data
    assert resolve_checkpoint(url) == path  # the cache, not the server
    model = build_multivit(size="micro", patch_size=8, image_size=32, in_domains=("rgb",))
    report = load_pretrained(model, url)
    assert server.requests == [f"/weights/{name}"]  # one download for three uses
    assert report.source == str(path) and report.format == ("multimae" if layout == "multivit" else "timm")
    assert sorted(report.loaded) == sorted(_rgb_encoder_keys(model))
    loaded = model.state_dict()
    for key in ("global_tokens", "input_adapters.rgb.proj.weight", "encoder.3.mlp.fc2.weight"):
        assert torch.equal(loaded[key], state[key]), key
    assert sorted(p.name for p in cache.iterdir()) == [name]  # no temporary files left beside it


def test_a_release_name_through_a_mirror_must_pass_its_hash(cache: Path, server, monkeypatch) -> None:
    released = RELEASED_WEIGHTS["multimae-b"]
    served, _ = _release_style_bytes("multivit")  # the right format, but not the bytes whose hash is afff3f8c
    server.files[f"/mirror/{released.file}"] = served
    monkeypatch.setenv(MIRROR_ENV, f"{server.url}/mirror/")
    url = f"{server.url}/mirror/{released.file}"
    assert release_url(released) == url

    with pytest.raises(WeightsDownloadError) as caught:
        resolve_checkpoint("multimae-b")
    message = str(caught.value)
    assert url in message and "sha256" in message and 'expected "afff3f8c"' in message
    assert hashlib.sha256(served).hexdigest() in message and "nothing was kept" in message
    assert server.requests == [f"/mirror/{released.file}"]
    assert list(cache.iterdir()) == []  # neither the corrupt file nor a partial one

    cfg = OmegaConf.create({"pretrained": "multimae-b"})  # what finetune.py makes of it: one config error
    with pytest.raises(ConfigError, match=r"^pretrained: .*afff3f8c"):
        resolve_pretrained(cfg)
    assert list(cache.iterdir()) == []


def test_offline_with_an_empty_cache_is_one_clear_error(cache: Path, server, monkeypatch) -> None:
    port = _closed_port()
    monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{port}")
    with pytest.raises(WeightsDownloadError) as caught:
        resolve_checkpoint("mae-b")
    message = str(caught.value)
    url = f"http://127.0.0.1:{port}/{RELEASED_WEIGHTS['mae-b'].file}"
    assert message.startswith(f"cannot download {url} (") and LOCAL_HINT in message
    assert str(cache / RELEASED_WEIGHTS["mae-b"].file) in message and MIRROR_ENV in message

    url = f"http://127.0.0.1:{port}/some/run/last.ckpt"
    with pytest.raises(WeightsDownloadError, match=rf"^cannot download {url} .*{LOCAL_HINT}"):
        resolve_checkpoint(url)
    missing = f"{server.url}/not/there.pth"  # a server that answers, without the file
    with pytest.raises(WeightsDownloadError, match=rf"^cannot download {missing} \(HTTP 404 Not Found\)"):
        resolve_checkpoint(missing)
    assert list(cache.iterdir()) == []


def test_a_cached_release_needs_no_network_and_states_its_licence(
    cache: Path, monkeypatch, caplog, tmp_path: Path
) -> None:
    # As torch.hub does, a file already in the cache is used as is: here a tiny stand-in under the release's name.
    released = RELEASED_WEIGHTS["mae-b"]
    data, state = _release_style_bytes("multivit")
    cache.mkdir(parents=True)
    (cache / released.file).write_bytes(data)
    monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{_closed_port()}")  # any download would fail
    model = build_multivit(size="micro", patch_size=8, image_size=32, in_domains=("rgb",))
    with caplog.at_level(logging.INFO, logger="attent_vision.models.released"):
        report = load_pretrained(model, "mae-b")
    assert report.source == str(cache / released.file)
    assert torch.equal(model.state_dict()["encoder.0.attn.qkv.weight"], state["encoder.0.attn.qkv.weight"])
    line = next(r.getMessage() for r in caplog.records if r.name == "attent_vision.models.released")
    assert line.startswith("pretrained weights mae-b (") and release_url(released) in line
    assert str(cache / released.file) in line and LICENCE_LINE in line

    monkeypatch.chdir(tmp_path)  # a local file of that name wins over the release
    torch.save({"model": state}, tmp_path / "mae-b")
    assert resolve_checkpoint("mae-b") == Path("mae-b")


def test_an_unknown_name_lists_what_pretrained_takes(cache: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"multimae-l does not exist; .*released name \(multimae-b, "):
        resolve_checkpoint("multimae-l")


@pytest.mark.slow
def test_finetune_loads_weights_served_over_http(cache: Path, server, tmp_path: Path) -> None:
    data, _ = _release_style_bytes("multivit")
    name = _hashed_name("micro_multivit", data)
    server.files[f"/{name}"] = data
    url = f"{server.url}/{name}"
    env = {"TORCH_HOME": str(tmp_path / "torch"), "no_proxy": "127.0.0.1", "NO_PROXY": "127.0.0.1"}
    proc = run_finetune(
        [*FINETUNE_TINY["cls"], *FINETUNE_COMMON, f"pretrained={url}", "trainer.max_epochs=1",
         "hydra.run.dir=outputs/ft_http"],
        cwd=tmp_path, env_overrides=env,
    )  # fmt: skip
    run = tmp_path / "outputs" / "ft_http"
    report = json.loads((run / "load_report.json").read_text())
    model = build_multivit(size="micro", patch_size=8, image_size=32, in_domains=("rgb",))
    assert report["format"] == "multimae" and sorted(report["loaded"]) == sorted(_rgb_encoder_keys(model))
    assert read_summary(run)["pretrained_checkpoint"] == str(cache / name)
    assert server.requests == [f"/{name}"]
    assert f"pretrained weights {url}, downloaded at {cache / name}" in proc.stderr


@pytest.mark.slow
def test_finetune_offline_names_the_url_and_the_local_file_option(cache: Path, tmp_path: Path) -> None:
    port = _closed_port()
    env = {"TORCH_HOME": str(tmp_path / "torch"), MIRROR_ENV: f"http://127.0.0.1:{port}"}
    proc = run_finetune(
        [*FINETUNE_TINY["cls"], *FINETUNE_COMMON, "pretrained=multimae-b"],
        cwd=tmp_path,
        env_overrides=env,
        check=False,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    url = f"http://127.0.0.1:{port}/{RELEASED_WEIGHTS['multimae-b'].file}"
    assert f"ConfigError: pretrained: cannot download {url}" in proc.stderr and LOCAL_HINT in proc.stderr
