"""Golden outputs of the reference MultiMAE (EPFL-VILAB/MultiMAE) run with our weights, for the test suite.

    python bench/reference_golden.py --reference-dir /tmp/multimae_ref \\
        --out tests/assets/multimae_reference_golden.safetensors

``--reference-dir`` is a local checkout of https://github.com/EPFL-VILAB/MultiMAE (the folder that holds
``multimae/multimae.py``), imported the way bench/vs_reference.py imports it; its code is never copied into this
repository. The reference commit is read with ``git rev-parse HEAD`` there, or given with ``--reference-commit``
when the folder is an export without ``.git``; the SHA-256 of the reference files that were imported is recorded
either way.

What is frozen: our micro pretraining module (``model=micro``, as ``python train.py model=micro`` builds it: 64
px, patch 8, encoder 128/4/4, one-block decoders, rgb/depth/semseg in and out plus ``norm_rgb``) initialised
under ``torch.manual_seed(--seed)``; a batch of 2 random rgb/depth/semseg inputs; masks drawn by our seeded
Dirichlet masking. The reference is built with the same geometry (``vs_reference.build_reference``), loaded with
our state dict (the key sets are identical) and run for one training step in fp32 on CPU
(``vs_reference.reference_step``: truncated depth standardisation, masked forward fed our masks, the four losses,
their sum, backward) with the optimizer step left out. It records the encoder tokens (the output of the encoder
blocks, global token last), each decoder's prediction, each task's loss, their sum, and the gradient norms of
:data:`GRAD_PARAMS`.

Two files come out: ``--out`` (safetensors: inputs, masks, outputs; about 0.4 MB) and the same name with
``.json`` (provenance: reference commit and file hashes, command, versions, the recipe of our model, and a
per-tensor fingerprint of our initial weights, too large to store at 10 MB). tests/test_reference_golden.py
rebuilds our module from that recipe, checks the fingerprint, runs the same step with the stored inputs and
masks and compares with the golden file at :data:`ATOL` / :data:`RTOL`. Before writing, this script runs our
model too (both attention kernels) and prints its largest differences from the reference.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import hashlib
import json
import platform
import shlex
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from throughput import ROOT, make_batch  # noqa: E402
from vs_reference import (  # noqa: E402  (bench/ is not a package)
    build_ours,
    build_reference,
    geometry_of,
    import_reference,
    our_step,
    reference_losses,
    reference_step,
)

DEFAULT_OUT = ROOT / "tests" / "assets" / "multimae_reference_golden.safetensors"
MODEL = "micro"
BATCH = 2
ATOL = RTOL = 1e-5
REFERENCE_URL = "https://github.com/EPFL-VILAB/MultiMAE"
# The reference files the golden outputs depend on (vs_reference imports these and nothing else from the checkout).
REFERENCE_FILES = (
    "multimae/multimae.py",
    "multimae/multimae_utils.py",
    "multimae/input_adapters.py",
    "multimae/output_adapters.py",
    "multimae/output_adapter_utils.py",
    "multimae/criterion.py",
)
# One or two parameters of every kind of layer: tokens, each input adapter, the first and last encoder blocks, a
# decoder's cross-attention and self-attention, task embeddings, mask token and an output projection.
GRAD_PARAMS = (
    "global_tokens",
    "input_adapters.rgb.proj.weight",
    "input_adapters.depth.proj.weight",
    "input_adapters.semseg.class_emb.weight",
    "encoder.0.attn.qkv.weight",
    "encoder.3.mlp.fc2.weight",
    "output_adapters.rgb.decoder.kv.weight",
    "output_adapters.rgb.task_embeddings.semseg",
    "output_adapters.depth.decoder_transformer.0.attn.qkv.weight",
    "output_adapters.semseg.out_proj.weight",
    "output_adapters.norm_rgb.mask_token",
)


# ------------------------------------------------------------------------------------------- shared with the test


def build_our_module(seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """Our micro MultiMAEPretrainModule from conf/ (``vs_reference.build_ours``) initialised under
    ``torch.manual_seed(seed)``, in train mode; the global RNG is left as it was. Returns (module, geometry)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module, cfg, _ = build_ours(MODEL, "config", None, [])
    return module.train(), geometry_of(module, cfg)


def weights_fingerprint(state_dict: dict[str, Tensor]) -> dict[str, list[float]]:
    """Per tensor, in float64: the sum, the sum of absolute values and the dot product with a ramp from -1 to 1
    (which a permutation of the values changes). It tells a changed initialisation apart from a changed forward,
    and, unlike a hash, tolerates the last-bit differences a CPU with other vector units can give."""
    fingerprint = {}
    for name, tensor in state_dict.items():
        values = tensor.detach().double().flatten()
        ramp = torch.linspace(-1.0, 1.0, values.numel(), dtype=torch.float64)
        fingerprint[name] = [values.sum().item(), values.abs().sum().item(), (values * ramp).sum().item()]
    return fingerprint


def fingerprint_mismatches(
    actual: dict[str, list[float]], expected: dict[str, list[float]], rtol: float = 1e-6
) -> list[str]:
    """Names of the tensors whose fingerprints differ (missing and extra tensors included)."""
    names = sorted(set(actual) | set(expected))
    return [
        name
        for name in names
        if name not in actual
        or name not in expected
        or not torch.allclose(torch.tensor(actual[name]), torch.tensor(expected[name]), rtol=rtol, atol=rtol)
    ]


class GradientsOnly:
    """Stands in for the optimizer of vs_reference's training steps: the gradients are computed and kept for
    reading, never applied, so the weights stay those the golden file was made with."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=True)

    def step(self) -> None:
        pass


@contextlib.contextmanager
def recording(hooks: dict[str, tuple[nn.Module, Callable[[tuple, Any], Any]]]) -> Iterator[dict[str, Any]]:
    """Records, while the block runs, ``pick(inputs, output)`` of each module's last call under its name."""
    records: dict[str, Any] = {}
    handles = []
    for name, (module, pick) in hooks.items():

        def hook(_: nn.Module, inputs: tuple, output: Any, name: str = name, pick: Callable = pick) -> None:
            records[name] = pick(inputs, output)

        handles.append(module.register_forward_hook(hook))
    try:
        yield records
    finally:
        for handle in handles:
            handle.remove()


def _outputs(
    records: dict[str, Any], task_losses: dict[str, Tensor], total: Tensor, model: nn.Module
) -> dict[str, Tensor]:
    """The golden file's output entries, from a step's records and the gradients it left on ``model``."""
    parameters = dict(model.named_parameters())
    return {
        "encoder_tokens": records["encoder"].detach(),
        **{f"pred/{task}": pred.detach().float() for task, pred in records["preds"].items()},
        **{f"loss/{task}": loss.detach().float() for task, loss in task_losses.items()},
        "loss/total": total.detach().float(),
        # In float64: the norm's own summation order must not count against the tolerance.
        **{f"grad_norm/{name}": parameters[name].grad.double().norm() for name in GRAD_PARAMS},
    }


def run_ours(module: nn.Module, batch: dict[str, Tensor], masks: Any, *, fused: bool) -> dict[str, Tensor]:
    """One fp32 training step of our module (``vs_reference.our_step``: ``sample_losses``, the batch reduction,
    task balancing, their sum, backward) on ``batch`` with ``masks`` (a TokenMasks) as the network's masks, in
    place of the ones it would draw from the sample seeds; the attention kernel is fused SDPA or the math one."""
    from attent_vision.models.attention import set_fused_attention

    net = module.net
    set_fused_attention(net, fused)
    step = our_step(module, GradientsOnly(module), contextlib.nullcontext)
    hooks = {
        "encoder": (net.encoder, lambda inputs, output: output),
        "preds": (net, lambda inputs, output: output[0]),
        # The balancer's input: each task's batch-reduced loss, before balancing (NoTaskBalancer in micro).
        "task_losses": (module.task_balancer, lambda inputs, output: dict(inputs[0])),
    }
    # An instance attribute shadows MultiMAE.sample_masks for this step only; deleted afterwards.
    net.sample_masks = lambda *args, **kwargs: masks
    try:
        with recording(hooks) as records:
            total = step(batch, None, {})
    finally:
        del net.sample_masks
    return _outputs(records, records["task_losses"], total, net)


def mismatches(
    actual: dict[str, Tensor], expected: dict[str, Tensor], atol: float = ATOL, rtol: float = RTOL
) -> list[str]:
    """One line per output entry that is missing, has another shape, or is not within atol + rtol·|expected|."""
    lines = []
    for key, want in expected.items():
        got = actual.get(key)
        if got is None:
            lines.append(f"{key}: missing")
        elif got.shape != want.shape:
            lines.append(f"{key}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        elif not torch.allclose(got.double(), want.double(), atol=atol, rtol=rtol):
            error = (got.double() - want.double()).abs()
            lines.append(
                f"{key}: max |diff| {error.max().item():.3g} (largest |expected| {want.abs().max().item():.3g}, "
                f"{int((error > atol + rtol * want.double().abs()).sum())} of {want.numel()} values out of tolerance)"
            )
    return lines


def load_golden(path: Path) -> tuple[dict[str, Tensor], Any, dict[str, Tensor], dict[str, Any]]:
    """Reads a golden file and its provenance: (batch, masks as TokenMasks, expected outputs, provenance)."""
    from safetensors.torch import load_file

    from attent_vision.models.masking import TokenMasks

    tensors = load_file(path)
    provenance = json.loads(path.with_suffix(".json").read_text())
    batch = {key.removeprefix("input/"): t for key, t in tensors.items() if key.startswith("input/")}
    task_masks = {task: tensors[f"mask/{task}"] for task in provenance["geometry"]["in_domains"]}
    masks = TokenMasks(task_masks, tensors["mask/ids_keep"], tensors["mask/ids_restore"])
    expected = {key: t for key, t in tensors.items() if not key.startswith(("input/", "mask/"))}
    return batch, masks, expected, provenance


# ---------------------------------------------------------------------------------------------- generation only


def run_reference(
    reference: nn.Module,
    losses: dict[str, nn.Module],
    geometry: dict[str, Any],
    batch: dict[str, Tensor],
    masks: Any,
) -> dict[str, Tensor]:
    """The same step on the reference (``vs_reference.reference_step``, fed ``masks`` as ``--same-masks`` does)."""
    step = reference_step(reference, losses, GradientsOnly(reference), contextlib.nullcontext, geometry)
    hooks = {
        "encoder": (reference.encoder, lambda inputs, output: output),
        "preds": (reference, lambda inputs, output: output[0]),
        **{f"loss/{task}": (loss, lambda inputs, output: output) for task, loss in losses.items()},
    }
    with recording(hooks) as records:
        total = step(batch, masks, {})
    # The losses' order, as ours reports them (the reference computes semseg, its fp32 decoder, last).
    task_losses = {task: records[f"loss/{task}"] for task in losses}
    return _outputs(records, task_losses, total, reference)


def draw_masks(module: nn.Module, batch: dict[str, Tensor], geometry: dict[str, Any]) -> Any:
    """The training masks of ``batch`` (epoch 0, per-sample seeds from its indices), drawn by our masking."""
    from attent_vision.models.masking import generate_random_masks

    masking = module.net.masking
    return generate_random_masks(
        {task: geometry["tokens_per_task"] for task in geometry["in_domains"]},
        batch_size=BATCH,
        num_encoded_tokens=masking.num_encoded_tokens,
        alphas=masking.alphas,
        sample_tasks_uniformly=masking.sample_tasks_uniformly,
        tie_break_noise=masking.tie_break_noise,
        mask_seeds=module.train_mask_seeds(batch["index"]),
    )


def load_our_weights(reference: nn.Module, net: nn.Module) -> None:
    """Copies our network's state dict into the reference: our module keeps the reference's key names and
    shapes (tests/test_pretrained_loading.py relies on that for released checkpoints), so the copy is 1:1."""
    ours, theirs = net.state_dict(), reference.state_dict()
    if set(ours) != set(theirs):
        sys.exit(
            f"state dict keys differ: only ours {sorted(set(ours) - set(theirs))}, "
            f"only the reference's {sorted(set(theirs) - set(ours))}"
        )
    reference.load_state_dict(ours, strict=True)


def reference_commit(reference_dir: Path, given: str | None) -> str:
    """``given``, else the checkout's HEAD commit; exits when neither is known."""
    if given:
        return given
    try:
        return subprocess.run(
            ["git", "-C", str(reference_dir), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sys.exit(f"{reference_dir} is not a git checkout: pass its commit with --reference-commit")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--reference-dir", type=Path, required=True, help="a local checkout of " + REFERENCE_URL
    )
    parser.add_argument("--reference-commit", help="its commit, when the folder has no .git")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="the golden .safetensors (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of our initial weights; the inputs use seed+1"
    )
    args = parser.parse_args()

    from safetensors.torch import save_file

    reference_dir = args.reference_dir.expanduser().resolve()
    ref = import_reference(reference_dir)
    commit = reference_commit(reference_dir, args.reference_commit)
    torch.set_num_threads(1)  # single-threaded, as the test suite runs (tests/conftest.py)

    module, geometry = build_our_module(args.seed)
    with torch.random.fork_rng():
        torch.manual_seed(args.seed + 1)
        batch = make_batch(
            BATCH, geometry["image_size"], geometry["num_classes"], geometry["semseg_stride"], "cpu"
        )
    masks = draw_masks(module, batch, geometry)

    reference = build_reference(ref, geometry)
    load_our_weights(reference, module.net)
    golden = run_reference(reference.train(), reference_losses(ref, geometry), geometry, batch, masks)

    comparison = {}
    for kernel in ("math", "fused"):
        ours = run_ours(module, batch, masks, fused=kernel == "fused")
        comparison[kernel] = {
            key: float((ours[key].double() - want.double()).abs().max()) for key, want in golden.items()
        }
        problems = mismatches(ours, golden)
        print(f"ours ({kernel} attention) vs reference: " + ("; ".join(problems) or f"all within {ATOL:g}"))

    tensors = {
        **{f"input/{key}": value for key, value in batch.items()},
        **{f"mask/{task}": mask for task, mask in masks.task_masks.items()},
        "mask/ids_keep": masks.ids_keep,
        "mask/ids_restore": masks.ids_restore,
        **golden,
    }
    out = args.out.expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(out))

    state = module.net.state_dict()
    weights_bytes = b"".join(t.detach().contiguous().numpy().tobytes() for t in state.values())
    display_out = out.relative_to(ROOT) if out.is_relative_to(ROOT) else out
    provenance = {
        "reference": {
            "repository": REFERENCE_URL,
            "commit": commit,
            "files_sha256": {
                name: hashlib.sha256((reference_dir / name).read_bytes()).hexdigest()
                for name in REFERENCE_FILES
            },
        },
        "command": f"python bench/reference_golden.py --reference-dir <checkout of {REFERENCE_URL} at {commit}> "
        f"--out {display_out} --seed {args.seed}",
        "command_run": shlex.join([Path(sys.executable).name, *sys.argv]),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {
            "torch": torch.__version__,
            "timm": __import__("timm").__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "machine": platform.machine(),
        },
        "recipe": {
            "model": f"conf model={MODEL} (bench/vs_reference.py build_ours with encoder 'config')",
            "seed": args.seed,
            "inputs": f"bench/throughput.py make_batch({BATCH}, ...) under torch.manual_seed({args.seed + 1}); stored",
            "masks": "our generate_random_masks with module.train_mask_seeds(index) (mask_seed 0, epoch 0); stored",
            "step": "fp32, CPU, 1 thread; vs_reference.reference_step with the optimizer step left out",
            "tolerance": {"atol": ATOL, "rtol": RTOL},
        },
        "geometry": geometry,
        "grad_params": list(GRAD_PARAMS),
        "ours_vs_reference_max_abs_diff": comparison,
        "initial_weights": {
            "sha256": hashlib.sha256(weights_bytes).hexdigest(),
            "fingerprint": weights_fingerprint(state),
        },
    }
    out.with_suffix(".json").write_text(json.dumps(provenance, indent=1) + "\n")

    size = out.stat().st_size + out.with_suffix(".json").stat().st_size
    print(f"wrote {display_out} and its .json ({size / 1e6:.2f} MB); reference {REFERENCE_URL} @ {commit}")
    for key, value in golden.items():
        if value.ndim == 0:
            print(f"  {key} = {value.item():.6g}")
    print(
        "regenerate with:\n  python bench/reference_golden.py --reference-dir /tmp/multimae_ref "
        f"--out {display_out}"
        + ("" if args.seed == 0 else f" --seed {args.seed}")
        + "\n(a checkout of the reference commit; add --reference-commit if it has no .git)"
    )


if __name__ == "__main__":
    main()
