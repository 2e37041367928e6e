"""Pack-only formats in a real ComfyUI (CPU): load, sample, LoRA, save, and stock's refusal.

For each of ``int8_blockwise``, ``float8_e4m3fn_rowwise`` and ``float8_e4m3fn_blockwise`` the CLI
writes a tiny Flux; its *dequantized reference* is the same file with every quantized layer
replaced by ``codes * scale`` in F32 (a plain file stock ComfyUI loads). Latent errors are
measured against the bf16 original sampled on the same seed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from comfyui_quantizer.nodes.layout_math import format_for
from comfyui_quantizer.quant_core import formats
from comfyui_quantizer.quant_core.comfy_quant import QUANT_METADATA_KEY, decode_settings

from .harness import REPO, ComfyServer, cli, comfy_env, read_latent, sample_graph, user_env

# name -> CLI flags. Block 48 does not divide the tiny Flux's 128-wide layers: padded grids.
PACK_FILES = {
    "int8_blockwise": ["--int8", "--scaling-mode", "block", "--block-size", "64"],
    "float8_e4m3fn_rowwise": ["--scaling-mode", "row"],
    "float8_e4m3fn_blockwise": ["--scaling-mode", "block", "--block-size", "48"],
}
# One Euler step of the tiny random Flux; FP8 E4M3 gives ~0.05 at any scale granularity
# (per-tensor FP8 in stock ComfyUI measures 0.052 on the same model and seed).
BOUNDS = {"int8_blockwise": 0.03, "float8_e4m3fn_rowwise": 0.08, "float8_e4m3fn_blockwise": 0.08}
LORA_NAME = "cq_test_lora.safetensors"


def read_all(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118


def write_dequantized(src: Path, dest: Path) -> Path:
    """``src`` with every ``.comfy_quant`` layer replaced by its F32 ``codes * scale``."""
    tensors, meta = read_all(src)
    out = {k: v for k, v in tensors.items() if not k.endswith((".comfy_quant", ".weight_scale"))}
    for key in [k for k in tensors if k.endswith(".comfy_quant")]:
        layer = key[: -len(".comfy_quant")]
        settings = decode_settings(tensors[key])
        fmt = format_for(settings["format"], settings.get("group_size"))
        codes, scale = tensors[layer + ".weight"], tensors[layer + ".weight_scale"]
        out[layer + ".weight"] = formats.dequantize(codes, scale, fmt, torch.float32)
    meta.pop(QUANT_METADATA_KEY, None)  # else ComfyUI would rebuild the .comfy_quant entries
    save_file(out, str(dest), metadata=meta)
    return dest


def write_lora(model: Path, dest: Path, *, rank: int = 4, seed: int = 1) -> Path:
    """A LoRA (``lora_unet_*.lora_up/down``) on every block linear, ~half the weights' size."""
    g = torch.Generator().manual_seed(seed)
    tensors, _ = read_all(model)
    lora = {}
    for key, w in tensors.items():
        if not key.endswith(".weight") or w.dim() != 2 or "blocks." not in key:
            continue
        out_f, in_f = w.shape
        name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        lora[name + ".lora_down.weight"] = torch.randn(rank, in_f, generator=g) / in_f**0.5
        lora[name + ".lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.5 / rank**0.5
    save_file(lora, str(dest))
    return dest


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def lora_graph(unet_name: str, *, latent_prefix: str, save_prefix: str | None) -> dict:
    graph = sample_graph(unet_name, latent_prefix=latent_prefix)
    graph["6"] = {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": ["1", 0], "lora_name": LORA_NAME, "strength_model": 1.0},
    }
    graph["4"]["inputs"]["model"] = ["6", 0]
    if save_prefix is not None:
        graph["7"] = {
            "class_type": "ModelSave",
            "inputs": {"model": ["6", 0], "filename_prefix": save_prefix},
        }
    return graph


def save_graph(unet_name: str, save_prefix: str) -> dict:
    loader = {"unet_name": unet_name, "weight_dtype": "default"}
    saver = {"model": ["1", 0], "filename_prefix": save_prefix}
    return {
        "1": {"class_type": "UNETLoader", "inputs": loader},
        "2": {"class_type": "ModelSave", "inputs": saver},
    }


def saved_file(server: ComfyServer, prefix: str) -> Path:
    files = sorted(server.folder("output").glob(f"{prefix}*.safetensors"))
    assert len(files) == 1, files
    return files[0]


@pytest.fixture(scope="module")
def files(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pack")
    out = {"bf16": tiny_flux}  # conftest.py
    for name, flags in PACK_FILES.items():
        dest = root / f"tiny_{name}.safetensors"
        done = cli("-i", str(out["bf16"]), "-o", str(dest), *flags, "--no-progress")
        assert done.returncode == 0, done.stderr
        assert "NEEDS the comfyui-quantizer pack" in done.stdout + done.stderr
        out[name] = dest
        out[name + "_ref"] = write_dequantized(dest, root / f"tiny_{name}_deqref.safetensors")
    out["lora"] = write_lora(out["bf16"], root / LORA_NAME)
    return out


@pytest.fixture(scope="module")
def with_pack(files: dict[str, Path]):
    with ComfyServer(with_pack=True) as server:
        for key, path in files.items():
            folder = "loras" if key == "lora" else "diffusion_models"
            shutil.copy(path, server.folder(folder) / path.name)
        yield server


def sample(server: ComfyServer, graph: dict, prefix: str) -> torch.Tensor:
    result = server.run(graph)
    assert result.status == "success", (result.events[-1:], server.log[-3000:])
    return read_latent(server, prefix)


def test_pack_registers_once_at_startup(with_pack: ComfyServer) -> None:
    lines = [ln for ln in with_pack.log.splitlines() if "comfyui-quantizer" in ln]
    assert any("pack-only formats registered with ComfyUI" in ln for ln in lines), lines
    assert not any("NOT available" in ln for ln in lines), lines


def test_pack_formats_load_and_sample_as_well_as_their_dequantized_reference(
    with_pack: ComfyServer, files: dict[str, Path]
) -> None:
    ref = sample(with_pack, sample_graph(files["bf16"].name, latent_prefix="bf16"), "bf16")
    rows = {}
    for name in PACK_FILES:
        got = sample(with_pack, sample_graph(files[name].name, latent_prefix=name), name)
        deq_name = name + "_ref"
        deq = sample(
            with_pack, sample_graph(files[deq_name].name, latent_prefix=deq_name), deq_name
        )
        rows[name] = (rel(got, ref), rel(deq, ref), rel(got, deq))
    print("\nformat                    err vs bf16  deq-ref err  pack vs deq-ref")
    for name, (err, err_ref, diff) in rows.items():
        print(f"{name:<25} {err:11.5f} {err_ref:12.5f} {diff:16.2e}")
    for name, (err, err_ref, diff) in rows.items():
        assert 0 < err < BOUNDS[name], f"{name}: latent error {err:.4f} vs bf16"
        # on CPU the pack runs the exact dequantize path: same error as the reference file
        assert err <= err_ref * 1.001 + 1e-6, f"{name}: {err:.5f} > reference {err_ref:.5f}"
        assert diff < 1e-4, f"{name}: differs from its dequantized reference"


def test_lora_on_pack_formats_and_saving_round_trips(
    with_pack: ComfyServer, files: dict[str, Path]
) -> None:
    base = sample(with_pack, sample_graph(files["bf16"].name, latent_prefix="b0"), "b0")
    ref = sample(
        with_pack, lora_graph(files["bf16"].name, latent_prefix="bl", save_prefix=None), "bl"
    )
    assert rel(ref, base) > 0.1, "the LoRA must change the result far more than quantization"
    for name in PACK_FILES:
        src_tensors, _ = read_all(files[name])
        # 1. plain save: codes, scales and settings come back bit for bit
        done = with_pack.run(save_graph(files[name].name, f"diffusion_models/plain_{name}"))
        assert done.status == "success", done.events[-1:]
        plain = saved_file(with_pack, f"diffusion_models/plain_{name}")
        saved, _ = read_all(plain)
        prefix = "model.diffusion_model."
        for key, tensor in src_tensors.items():
            if key.endswith(".comfy_quant"):
                assert decode_settings(saved[prefix + key]) == decode_settings(tensor), key
            elif key.endswith((".weight_scale", ".weight")) and tensor.dtype != torch.bfloat16:
                assert torch.equal(saved[prefix + key].view(torch.uint8), tensor.view(torch.uint8))
        # ... and the saved checkpoint loads through CheckpointLoaderSimple too
        shutil.copy(plain, with_pack.folder("checkpoints") / f"ckpt_{name}.safetensors")
        graph = sample_graph("unused", latent_prefix=f"c_{name}")
        graph["1"] = {
            "class_type": "CheckpointLoaderSimple",
            "inputs": {"ckpt_name": f"ckpt_{name}.safetensors"},
        }
        from_ckpt = sample(with_pack, graph, f"c_{name}")
        plain_latent = sample(with_pack, sample_graph(files[name].name, latent_prefix=f"p_{name}"),
                              f"p_{name}")  # fmt: skip
        assert torch.equal(from_ckpt, plain_latent), f"{name}: checkpoint samples differently"
        # 2. LoRA on the pack format, sampled and saved in one graph
        lat = f"l_{name}"
        graph = lora_graph(
            files[name].name, latent_prefix=lat, save_prefix=f"diffusion_models/lora_{name}"
        )
        got = sample(with_pack, graph, lat)
        deq = f"{name}_ref"
        got_ref = sample(
            with_pack, lora_graph(files[deq].name, latent_prefix=f"l_{deq}", save_prefix=None),
            f"l_{deq}",
        )  # fmt: skip
        err, err_ref = rel(got, ref), rel(got_ref, ref)
        print(f"\n{name}+LoRA: error vs bf16+LoRA {err:.5f}, dequantized reference {err_ref:.5f}")
        # the patched weight is re-quantized (round-to-nearest): about sqrt(2) x the error
        assert 0 < err < min(2.0 * err_ref, BOUNDS[name]), f"{name}+LoRA: {err:.4f} ({err_ref:.4f})"
        merged = saved_file(with_pack, f"diffusion_models/lora_{name}")
        tensors, _ = read_all(merged)
        confs = {k: decode_settings(v) for k, v in tensors.items() if k.endswith(".comfy_quant")}
        src_confs = [
            decode_settings(v) for k, v in src_tensors.items() if k.endswith(".comfy_quant")
        ]
        assert len(confs) == len(src_confs) and all(c == src_confs[0] for c in confs.values())
        patched = [k for k in confs if "blocks." in k]
        assert patched and all(
            not torch.equal(tensors[k.replace(".comfy_quant", ".weight_scale")],
                            saved[k.replace(".comfy_quant", ".weight_scale")])
            for k in patched
        ), "the LoRA was not merged into the saved codes"  # fmt: skip
        # 3. the merged file reloads in the pack format and samples the LoRA result
        shutil.copy(merged, with_pack.folder("diffusion_models") / f"merged_{name}.safetensors")
        again = sample(
            with_pack, sample_graph(f"merged_{name}.safetensors", latent_prefix=f"m_{name}"),
            f"m_{name}",
        )  # fmt: skip
        assert rel(again, got) < 1e-5, f"{name}: merged file samples differently"


def test_stock_comfyui_refuses_pack_formats_with_its_own_error(files: dict[str, Path]) -> None:
    with ComfyServer(with_pack=False) as server:
        for name in PACK_FILES:
            shutil.copy(files[name], server.folder("diffusion_models") / files[name].name)
        for name in PACK_FILES:
            result = server.run(sample_graph(files[name].name, latent_prefix=name))
            assert result.status == "error", result.events[-1:]
            (error,) = result.of_type("execution_error")
            assert error["node_type"] == "UNETLoader"
            assert error["exception_type"] == "KeyError", error
            assert json.loads(error["exception_message"].replace("'", '"')) == name, error


IN_PROCESS = """
import importlib.util, json, logging, os, sys
logging.basicConfig(level=logging.INFO)
repo, comfy_dir = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_dir); os.chdir(comfy_dir); sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.ops, comfy.quant_ops
stock_load = comfy.ops._load_quantized_module
# Pretend this ComfyUI already implements int8_blockwise with one of its own layouts.
comfy.quant_ops.QUANT_ALGOS["int8_blockwise"] = dict(comfy.quant_ops.QUANT_ALGOS["int8_tensorwise"])
statuses = []
for alias in ("pack_a", "pack_b"):  # the pack imported twice (two names)
    spec = importlib.util.spec_from_file_location(
        alias, os.path.join(repo, "__init__.py"), submodule_search_locations=[repo])
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    from importlib import import_module
    statuses.append(import_module(alias + ".nodes.comfy_runtime").register().__dict__)
load = comfy.ops._load_quantized_module
print(json.dumps({
    "statuses": statuses,
    "wraps_stock_once": load.__wrapped__ is stock_load,
    "layouts": {k: v["comfy_tensor_layout"] for k, v in comfy.quant_ops.QUANT_ALGOS.items()},
}))
"""


def test_registration_keeps_comfyui_formats_and_is_idempotent(tmp_path: Path) -> None:
    """In-process real ComfyUI: a name it already knows stays its own; importing twice is safe."""
    env = comfy_env()
    assert env is not None
    script = tmp_path / "in_process.py"
    script.write_text(IN_PROCESS)
    done = subprocess.run(
        [str(env[1]), str(script), str(REPO), str(env[0])],
        capture_output=True, text=True, env=user_env(),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["wraps_stock_once"], got
    assert got["layouts"]["int8_blockwise"] == "TensorWiseINT8Layout", got
    assert got["layouts"]["float8_e4m3fn_blockwise"] == "CQFloat8BlockwiseLayout", got
    for status in got["statuses"]:
        assert status["unsupported"] is None
        assert status["left_to_comfyui"] == ["int8_blockwise"]
        assert status["registered"] == ["float8_e4m3fn_blockwise", "float8_e4m3fn_rowwise"]
    assert "ComfyUI already implements int8_blockwise" in done.stderr
