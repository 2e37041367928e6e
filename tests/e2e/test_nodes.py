"""The nodes in a real ComfyUI: Load -> Quantize -> Save, progress, cancel, errors, reload.

One server (with the pack) serves the whole module; tiny random Flux models are built by
ComfyUI's own model class. Sampling compares one Euler step's latent with the bf16 model's.
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from .harness import (
    ComfyServer,
    RunResult,
    cli,
    make_random_model,
    make_tiny_flux,
    read_latent,
    sample_graph,
)

QUANTIZE, LOAD, SAVE = "QuantizerQuantize", "QuantizerLoadModel", "QuantizerSave"
BOUNDS = {"fp8 tensor": 0.05, "int8 row": 0.02}  # relative latent error vs bf16 (acceptance)
TAGS = {"fp8 tensor": "fp8", "int8 row": "int8row"}


@pytest.fixture(scope="module")
def models(tiny_flux: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {
        "tiny": tiny_flux,  # conftest.py
        # Large enough (about 5 s of work on CPU) to press Cancel halfway through.
        "slow": make_tiny_flux(folder / "slow_flux.safetensors", hidden=512, seed=1),
    }


@pytest.fixture(scope="module")
def server(models: dict[str, Path]) -> Any:
    with ComfyServer() as s:
        for path in models.values():
            shutil.copy(path, s.folder("diffusion_models") / path.name)
        yield s


def quantize_node(source: list[Any], fmt: str, **widgets: Any) -> dict[str, Any]:
    inputs = {"source": source, "preset": "auto", "format": fmt, "block_size": 128,
              "rounding": "nearest", "seed": 0, "layer_config": "", "keep_dtype": "auto",
              "device": "auto"}  # fmt: skip
    if source[0] == "model":  # a MODEL input instead of a file
        inputs = {**inputs, "model": source[1]}
        del inputs["source"]
    inputs.update(widgets)
    return {"class_type": QUANTIZE, "inputs": inputs}


def save_node(quantized: list[Any], prefix: str, destination: str = "auto") -> dict[str, Any]:
    return {"class_type": SAVE, "inputs": {"quantized": quantized, "filename_prefix": prefix,
                                           "destination": destination}}  # fmt: skip


def load_node(name: str) -> dict[str, Any]:
    return {"class_type": LOAD, "inputs": {"model_name": f"diffusion_models/{name}"}}


def unet_loader(name: str) -> dict[str, Any]:
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}


def sampler(model: list[Any], prefix: str, ids: tuple[str, str, str, str]) -> dict[str, Any]:
    """Conditioning, latent, one Euler step on ``model``, SaveLatent ``prefix`` (as harness)."""
    cond, latent, ksampler, save = ids
    graph = sample_graph("unused", latent_prefix=prefix)
    graph["4"]["inputs"].update(model=model, positive=[cond, 0], negative=[cond, 0],
                                latent_image=[latent, 0])  # fmt: skip
    graph["5"]["inputs"]["samples"] = [ksampler, 0]
    return {cond: graph["2"], latent: graph["3"], ksampler: graph["4"], save: graph["5"]}


def saved_name(result: RunResult, node: str) -> str:
    return result.outputs(node)["comfyui_quantizer_saved"][0]["filename"]


def rel_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def test_object_info_lists_the_nodes_with_their_widgets(server: ComfyServer) -> None:
    info = server.get("/object_info")
    load, quant, save = info[LOAD], info[QUANTIZE], info[SAVE]
    assert (
        "diffusion_models/tiny_flux.safetensors"
        in load["input"]["required"]["model_name"][1]["options"]
    )
    assert load["output"] == ["QUANT_SOURCE"]
    widgets = quant["input"]["required"]
    assert set(widgets) >= {"preset", "format", "block_size", "rounding", "seed",
                            "layer_config", "keep_dtype", "device"}  # fmt: skip
    assert quant["input_order"]["required"][0] == "preset"
    assert widgets["preset"][1]["options"][0] == "auto"
    assert {"flux1", "wan", "qwen", "t5xxl", "llm"} <= set(widgets["preset"][1]["options"])
    assert widgets["layer_config"][1]["multiline"] is True
    formats = widgets["format"][1]["options"]
    assert formats[:3] == ["fp8 tensor", "int8 row", "int8 tensor"]  # stock-loadable first
    assert all(f.endswith("[needs pack]") for f in formats[3:])
    assert set(quant["input"]["optional"]) == {
        "source", "model", "clip", "calibration", "objective", "optimizer", "lr_schedule", "lr",
        "iterations", "lr_gamma", "lr_patience", "lr_factor", "lr_min"}  # fmt: skip
    assert quant["output"] == ["QUANTIZED_MODEL", "MODEL", "STRING"]
    assert save["output_node"] is True
    assert save["input"]["required"]["destination"][1]["options"] == [
        "auto", "diffusion_models", "text_encoders", "checkpoints", "output"]  # fmt: skip


@pytest.fixture(scope="module")
def quantized_run(server: ComfyServer, models: dict[str, Path]) -> dict[str, Any]:
    """One prompt: Load -> Quantize (fp8, int8 row) -> Save, the in-graph MODELs and the
    original sampled; then the saved files sampled through UNETLoader in new prompts."""
    graph: dict[str, Any] = {"1": load_node(models["tiny"].name)}
    graph["2"] = quantize_node(["1", 0], "fp8 tensor")
    graph["3"] = save_node(["2", 0], "e2e/flux_fp8")
    graph["4"] = quantize_node(["1", 0], "int8 row")
    graph["5"] = save_node(["4", 0], "e2e/flux_int8row")
    graph.update(sampler(["2", 1], "ingraph_fp8", ("10", "11", "12", "13")))
    graph.update(sampler(["4", 1], "ingraph_int8row", ("20", "21", "22", "23")))
    graph["30"] = unet_loader(models["tiny"].name)
    graph.update(sampler(["30", 0], "bf16", ("31", "32", "33", "34")))
    first = server.run(graph)
    assert first.status == "success", (first.events[-1:], server.log[-3000:])
    names = {"fp8 tensor": saved_name(first, "3"), "int8 row": saved_name(first, "5")}
    unet_list = server.get("/object_info/UNETLoader")["UNETLoader"]["input"]["required"][
        "unet_name"
    ][0]
    load_list = server.get(f"/object_info/{LOAD}")[LOAD]["input"]["required"]["model_name"][1][
        "options"
    ]
    reloaded = {}
    for fmt, name in names.items():
        again = server.run(sample_graph(name, latent_prefix=f"saved_{TAGS[fmt]}"))
        assert again.status == "success", (again.events[-1:], server.log[-3000:])
        reloaded[fmt] = read_latent(server, f"saved_{TAGS[fmt]}")
    return {"first": first, "names": names, "unet_list": unet_list, "load_list": load_list,
            "reloaded": reloaded}  # fmt: skip


def test_progress_rises_to_max_per_layer(quantized_run: dict[str, Any]) -> None:
    first: RunResult = quantized_run["first"]
    for node in ("2", "4"):
        values = [(p["value"], p["max"]) for p in first.of_type("progress") if p["node"] == node]
        assert values, "no progress event for the Quantize node"
        assert len({m for _, m in values}) == 1
        total = values[0][1]
        assert total == 84  # one step per tensor of the tiny Flux
        assert [v for v, _ in values] == sorted(v for v, _ in values)
        assert values[-1][0] == total
        layers = [e for e in first.of_type("comfyui_quantizer.layer") if e["node"] == node]
        assert [e["done"] for e in layers] == list(range(1, total + 1))
        rows = [e["row"] for e in layers if e["row"]]
        done = [e for e in first.of_type("comfyui_quantizer.done") if e["node"] == node]
        assert len(done) == 1 and done[0]["rows"] == rows and done[0]["stock_loadable"] is True
        assert first.outputs(node)["comfyui_quantizer"][0] == done[0]


def test_saved_files_appear_in_the_loader_list_without_restart(
    quantized_run: dict[str, Any], server: ComfyServer
) -> None:
    for name in quantized_run["names"].values():
        assert re.fullmatch(r"e2e/flux_(fp8|int8row)_00001_\.safetensors", name), name
        assert name in quantized_run["unet_list"]
        assert f"diffusion_models/{name}" in quantized_run["load_list"]
        assert (server.folder("diffusion_models") / name).is_file()


@pytest.mark.parametrize("fmt", list(BOUNDS))
def test_saved_file_samples_like_the_in_graph_model_and_close_to_bf16(
    quantized_run: dict[str, Any], server: ComfyServer, fmt: str
) -> None:
    ref = read_latent(server, "bf16")
    in_graph = read_latent(server, f"ingraph_{TAGS[fmt]}")
    reloaded = quantized_run["reloaded"][fmt]
    assert torch.equal(in_graph, reloaded), "in-graph MODEL differs from the saved-and-reloaded"
    rel = rel_error(reloaded, ref)
    print(f"{fmt}: relative latent error vs bf16 {rel:.4f} (bound {BOUNDS[fmt]})")
    assert 0 < rel < BOUNDS[fmt]


def test_a_second_save_with_the_same_prefix_gets_a_new_name(
    server: ComfyServer, models: dict[str, Path]
) -> None:
    graph = {"1": load_node(models["tiny"].name), "2": quantize_node(["1", 0], "fp8 tensor")}
    graph["3"] = save_node(["2", 0], "twice/flux", "output")
    graph["4"] = save_node(["2", 0], "twice/flux", "output")
    result = server.run(graph)
    assert result.status == "success", result.events[-1:]
    names = {saved_name(result, "3"), saved_name(result, "4")}
    assert names == {"twice/flux_00001_.safetensors", "twice/flux_00002_.safetensors"}
    files = [server.folder("output") / n for n in names]
    assert files[0].read_bytes() == files[1].read_bytes()
    again = server.run({**graph, "4": save_node(["2", 0], "twice/flux", "output")})
    # ComfyUI caches an unchanged output node; a changed one saves under the next number.
    graph5 = {**graph, "5": save_node(["2", 0], "twice/flux", "output")}
    del graph5["3"], graph5["4"]
    third = server.run(graph5)
    assert again.status == third.status == "success"
    assert saved_name(third, "5") == "twice/flux_00003_.safetensors"


@pytest.mark.parametrize("prefix", ["../escaped", "/tmp/escaped", "a/../../escaped", "..\\x"])
def test_a_path_escaping_prefix_is_refused(
    server: ComfyServer, models: dict[str, Path], prefix: str
) -> None:
    graph = {"1": load_node(models["tiny"].name), "2": quantize_node(["1", 0], "fp8 tensor")}
    graph["3"] = save_node(["2", 0], prefix)
    result = server.run(graph)
    assert result.status == "rejected"
    errors = result.error["node_errors"]["3"]["errors"]  # type: ignore[index]
    assert any("filename_prefix" in e["details"] for e in errors), errors
    assert not list(server.root.rglob("escaped*"))
    assert not Path("/tmp/escaped_00001_.safetensors").exists()


def test_cancel_mid_run_stops_within_a_second_and_leaves_no_file(
    server: ComfyServer, models: dict[str, Path]
) -> None:
    graph = {"1": load_node(models["slow"].name), "2": quantize_node(["1", 0], "int8 row")}
    graph["3"] = save_node(["2", 0], "cancelled/flux")
    before = {p for p in server.root.rglob("*") if p.is_file()}
    pressed: dict[str, float] = {}

    def press_cancel(event: dict[str, Any]) -> None:
        data = event.get("data", {})
        if event["type"] == "comfyui_quantizer.layer" and data.get("done") == 10 and not pressed:
            pressed["at"] = time.monotonic()
            server.post("/interrupt", {})
        if event["type"] == "execution_interrupted":
            pressed["stopped"] = time.monotonic()

    result = server.run(graph, on_event=press_cancel)
    assert result.status == "interrupted", result.events[-1:]
    latency = pressed["stopped"] - pressed["at"]
    print(f"cancel latency {latency:.3f} s")
    assert latency < 1.5
    layers = [e for e in result.of_type("comfyui_quantizer.layer") if e["node"] == "2"]
    assert 10 <= len(layers) < layers[0]["total"]
    after = {p for p in server.root.rglob("*") if p.is_file()}
    left = {p for p in after - before if p.suffix != ".log" and p.name != "server.log"}
    assert not [p for p in left if "quantiz" in p.name or p.suffix in (".safetensors", ".partial")]
    assert not list((server.folder("temp") / "comfyui_quantizer").glob("*.partial"))
    assert not list(server.folder("diffusion_models").rglob("cancelled*"))


def test_errors_show_as_node_errors_with_the_message(
    server: ComfyServer, quantized_run: dict[str, Any]
) -> None:
    saved = quantized_run["names"]["fp8 tensor"]
    graph = {"1": load_node(saved), "2": quantize_node(["1", 0], "fp8 tensor")}
    graph["3"] = save_node(["2", 0], "never")
    result = server.run(graph)
    assert result.status == "error"
    error = result.of_type("execution_error")[0]
    assert error["node_id"] == "2"
    assert "already quantized" in error["exception_message"]
    assert error["exception_message"].strip().count("\n") == 0, "one line"
    assert error["exception_type"].endswith("QuantizerError")
    # The user error is raised at the node boundary: no quant_core frames in the traceback.
    assert "quant_core" not in "".join(error["traceback"])
    # Two sources at once is refused the same way.
    graph["4"] = unet_loader(saved)
    graph["2"]["inputs"]["model"] = ["4", 0]
    both = server.run(graph)
    assert both.status == "error"
    message = both.of_type("execution_error")[0]["exception_message"]
    assert "connect exactly one of the inputs source, model or clip (got source, model)" in message


def test_model_input_bakes_a_lora_into_the_quantized_weights(
    server: ComfyServer, models: dict[str, Path]
) -> None:
    original = load_file(str(models["tiny"]))
    layer = "double_blocks.0.img_attn.qkv"
    weight = original[f"{layer}.weight"].double()
    g = torch.Generator().manual_seed(5)
    rank = 4
    up = torch.randn(weight.shape[0], rank, generator=g) * 0.05
    down = torch.randn(rank, weight.shape[1], generator=g) * 0.05
    lora = {f"diffusion_model.{layer}.lora_up.weight": up,
            f"diffusion_model.{layer}.lora_down.weight": down,
            f"diffusion_model.{layer}.alpha": torch.tensor(float(rank))}  # fmt: skip
    save_file(lora, str(server.folder("loras") / "e2e_lora.safetensors"))
    graph = {
        "1": unet_loader(models["tiny"].name),
        "2": {"class_type": "LoraLoaderModelOnly",
              "inputs": {"model": ["1", 0], "lora_name": "e2e_lora.safetensors",
                         "strength_model": 1.0}},
        "3": quantize_node(["model", ["2", 0]], "int8 row"),
        "4": save_node(["3", 0], "lora/baked"),
    }  # fmt: skip
    result = server.run(graph)
    assert result.status == "success", (result.events[-1:], server.log[-3000:])
    saved = load_file(str(server.folder("diffusion_models") / saved_name(result, "4")))
    got = saved[f"{layer}.weight"].double() * saved[f"{layer}.weight_scale"].double()
    baked = weight + up.double() @ down.double()

    def sqnr(ref: torch.Tensor) -> float:
        return float(10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()))

    print(f"SQNR vs W+BA {sqnr(baked):.1f} dB, vs W {sqnr(weight):.1f} dB")
    assert sqnr(baked) > 35  # INT8 per-row of the LoRA-patched weight
    assert sqnr(weight) < sqnr(baked) - 10
    # ComfyUI holds the MODEL in fp32 on CPU; unquantized tensors still come out in bf16
    # (keep_dtype auto), as in the original file, and equal to it.
    assert saved[f"{layer}.bias"].dtype == original[f"{layer}.bias"].dtype == torch.bfloat16
    assert torch.equal(saved[f"{layer}.bias"], original[f"{layer}.bias"])


@pytest.fixture(scope="module")
def t5_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_random_model("t5-base", tmp_path_factory.mktemp("t5") / "t5_base.safetensors")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qwen3") / "qwen3_06b.safetensors"
    return make_random_model("qwen3-06b", path)


def encode_graph(name: str, out: str, clip_type: str) -> dict[str, Any]:
    """CLIPLoader -> CLIPTextEncode -> save the conditioning tensor to output/<out>."""
    return {
        "11": {"class_type": "CLIPLoader",
               "inputs": {"clip_name": name, "type": clip_type, "device": "default"}},
        "12": {"class_type": "CLIPTextEncode",
               "inputs": {"clip": ["11", 0], "text": "a red fox in the snow, at dusk"}},
        "13": {"class_type": "CQTestSaveConditioning",
               "inputs": {"conditioning": ["12", 0], "filename": out}},
    }  # fmt: skip


def test_a_t5_base_text_encoder_is_refused_by_file_and_by_clip(
    server: ComfyServer, t5_base: Path
) -> None:
    """ComfyUI's T5-base loader ignores quantization: measured, an INT8 per-row T5-base loads
    and conditions 94 % off bf16 (2 % from the quantization itself). Both routes refuse it."""
    out = t5_base.with_name("t5_base_int8row.safetensors")
    done = cli("-i", str(t5_base), "-o", str(out), "--int8", "--scaling-mode", "row")
    assert done.returncode != 0
    assert "ignores quantization" in done.stderr and str(t5_base) in done.stderr
    assert not out.exists()
    shutil.copy(t5_base, server.folder("text_encoders") / t5_base.name)
    graph = encode_graph(t5_base.name, "unused", "stable_audio")
    del graph["12"], graph["13"]
    graph["1"] = quantize_node(["11", 0], "int8 row")
    graph["1"]["inputs"]["clip"] = graph["1"]["inputs"].pop("source")
    graph["2"] = save_node(["1", 0], "e2e/t5base_refused")
    result = server.run(graph)
    assert result.status == "error"
    error = result.of_type("execution_error")[0]
    assert error["node_id"] == "1" and "ignores quantization" in error["exception_message"]
    folders = [server.folder("text_encoders"), server.folder("clip")]
    assert not [f for folder in folders for f in folder.rglob("t5base_refused*")]


def test_clip_input_quantizes_an_llm_text_encoder_that_clip_loader_reloads(
    server: ComfyServer, qwen3: Path
) -> None:
    """CLIPLoader -> Quantize(clip) -> Save gives the same codes as quantizing the file, and
    CLIPLoader loads and encodes with it, close to bf16 (its loader honours the scales)."""
    shutil.copy(qwen3, server.folder("text_encoders") / qwen3.name)
    by_file = qwen3.with_name("qwen3_06b_int8row_cli.safetensors")
    done = cli("-i", str(qwen3), "-o", str(by_file), "--int8", "--scaling-mode", "row")
    assert done.returncode == 0, done.stderr
    shutil.copy(by_file, server.folder("text_encoders") / by_file.name)

    graph = encode_graph(qwen3.name, "cond_bf16", "stable_diffusion")
    graph["1"] = quantize_node(["11", 0], "int8 row")
    graph["1"]["inputs"]["clip"] = graph["1"]["inputs"].pop("source")
    graph["2"] = save_node(["1", 0], "e2e/qwen3")
    first = server.run(graph, timeout=600)
    assert first.status == "success", (first.events[-1:], server.log[-3000:])
    name = saved_name(first, "2")
    assert first.outputs("2")["comfyui_quantizer_saved"][0]["folder"] == "text_encoders"
    listed = server.get("/object_info/CLIPLoader")["CLIPLoader"]["input"]["required"]
    assert name in listed["clip_name"][0]
    # text_encoders' first folder may be its legacy alias clip/ (CLIPLoader lists both).
    folders = [server.folder("text_encoders"), server.folder("clip")]
    (path,) = [folder / name for folder in folders if (folder / name).is_file()]
    saved, reference = load_file(str(path)), load_file(str(by_file))
    # Same tensors as quantizing the encoder's own file: names, dtypes and 8-bit codes.
    assert set(saved) == set(reference)
    quantized = [k for k, v in reference.items() if v.dtype == torch.int8]
    assert len(quantized) == 28 * 7  # q, k, v, o, gate, up, down of 28 layers
    for key in quantized:
        assert torch.equal(saved[key], reference[key]), key
    # Kept tensors hold the same values (a CLIP source has the dtype ComfyUI holds it in).
    for key, tensor in reference.items():
        if key not in quantized:
            assert torch.allclose(saved[key].float(), tensor.float(), rtol=1e-2, atol=1e-4), key
    changed = {k for k, t in reference.items() if saved[k].dtype != t.dtype}
    print(f"dtype differs from the file route for {sorted(changed)}")
    for name_, out in ((name, "cond_node"), (by_file.name, "cond_cli")):
        again = server.run(encode_graph(name_, out, "stable_diffusion"), timeout=600)
        assert again.status == "success", (again.events[-1:], server.log[-3000:])
    conds = {k: load_file(str(server.folder("output") / f"cond_{k}.safetensors"))["cond"]
             for k in ("bf16", "node", "cli")}  # fmt: skip
    node_vs_cli = rel_error(conds["node"], conds["cli"])
    node_vs_bf16 = rel_error(conds["node"], conds["bf16"])
    print(f"conditioning: CLIP route vs file route {node_vs_cli:.2e}; vs bf16 {node_vs_bf16:.3f}")
    assert node_vs_cli < 1e-3
    # Measured 0.032 (its dequantized weights as a bf16 file: 0.033); a loader that ignored
    # the scales would be ~1.
    assert node_vs_bf16 < 0.08


def test_a_pack_only_format_is_saved_and_says_so(
    server: ComfyServer, models: dict[str, Path]
) -> None:
    graph = {"1": load_node(models["tiny"].name)}
    graph["2"] = quantize_node(["1", 0], "fp8 block [needs pack]", block_size=64)
    graph["3"] = save_node(["2", 0], "packonly/flux")
    result = server.run(graph)
    assert result.status == "success", (result.events[-1:], server.log[-3000:])
    summary = result.outputs("2")["comfyui_quantizer"][0]
    assert summary["stock_loadable"] is False
    assert "NEEDS the comfyui-quantizer pack" in summary["loadability"]
    assert result.outputs("3")["comfyui_quantizer_saved"][0]["loads_in_stock_comfyui"] is False
    saved = load_file(str(server.folder("diffusion_models") / saved_name(result, "3")))
    assert saved["double_blocks.0.img_attn.qkv.weight_scale"].shape == (384 // 64, 128 // 64)
    # With the pack installed its runtime registers the block layouts, so ComfyUI rebuilds
    # the MODEL output too (without it the node would add a "no MODEL output" note).
    assert not [n for n in summary["notes"] if n.startswith("no MODEL output")], summary["notes"]


def test_calibrate_then_learned_rounding_in_the_graph(
    server: ComfyServer, models: dict[str, Path], quantized_run: dict[str, Any]
) -> None:
    """Calibrate (2 Euler steps of the bf16 model) -> Quantize(learned, int8 row) -> sample."""
    graph = sampler(["1", 0], "unused_calibration", ("2", "3", "4", "5"))
    del graph["4"], graph["5"]  # keep the conditioning and latent nodes only
    graph["1"] = unet_loader(models["tiny"].name)
    graph["6"] = {"class_type": "QuantizerCalibrate",
                  "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
                             "latent_image": ["3", 0], "seed": 0, "steps": 2, "cfg": 1.0,
                             "sampler_name": "euler", "scheduler": "simple"}}  # fmt: skip
    graph["7"] = load_node(models["tiny"].name)
    graph["8"] = quantize_node(["7", 0], "int8 row", rounding="learned", calibration=["6", 0])
    graph["9"] = save_node(["8", 0], "learned/flux_int8row")
    graph.update(sampler(["8", 1], "learned_int8row", ("10", "11", "12", "13")))
    result = server.run(graph)
    assert result.status == "success", (result.events[-1:], server.log[-3000:])
    summary = result.outputs("8")["comfyui_quantizer"][0]
    assert any(n.startswith("learned rounding:") for n in summary["notes"]), summary["notes"]
    assert any(n.startswith("calibration ") for n in summary["notes"]), summary["notes"]
    assert all(isinstance(r["output_sqnr_db"], float) for r in summary["rows"]), summary["rows"]
    ref = read_latent(server, "bf16")
    rel = rel_error(read_latent(server, "learned_int8row"), ref)
    nearest = rel_error(quantized_run["reloaded"]["int8 row"], ref)
    print(f"int8 row vs bf16: learned {rel:.4f}, nearest {nearest:.4f}; {summary['notes']}")
    assert 0 < rel < BOUNDS["int8 row"]
