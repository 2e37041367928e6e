"""A real ComfyUI server for end-to-end tests, with this pack installed from the checkout.

``ComfyServer`` starts ``$COMFYUI_PYTHON main.py --cpu`` on a free loopback port with every
folder it writes (user, input, output, temp, models) under one temporary directory, loads the pack
through ``--extra-model-paths-config`` (a ``custom_nodes`` folder holding a link to this
checkout, plus a small test-only node pack), and talks to it over HTTP and the websocket.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
MODEL_FOLDERS = ("diffusion_models", "checkpoints", "text_encoders", "clip", "vae", "loras")

# Test-only nodes: Flux conditioning without a text encoder (random context + pooled vector),
# and a CONDITIONING written to the output folder (to compare text encoders).
TEST_NODES = """
import torch

class CQTestConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        names = {"seed": 0, "context_dim": 64, "pooled_dim": 32, "tokens": 8}
        return {"required": {k: ("INT", {"default": v}) for k, v in names.items()}}
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "testing"

    def make(self, seed, context_dim, pooled_dim, tokens):
        g = torch.Generator().manual_seed(seed)
        context = torch.randn(1, tokens, context_dim, generator=g)
        pooled = torch.randn(1, pooled_dim, generator=g)
        return ([[context, {"pooled_output": pooled, "guidance": 3.5}]],)

class CQTestSaveConditioning:
    # Writes a CONDITIONING's first tensor to <output>/<filename>.safetensors.
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"conditioning": ("CONDITIONING",), "filename": ("STRING", {})}}
    RETURN_TYPES = ()
    FUNCTION = "save"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def save(self, conditioning, filename):
        import os
        import folder_paths
        from safetensors.torch import save_file
        path = os.path.join(folder_paths.get_output_directory(), filename + ".safetensors")
        save_file({"cond": conditioning[0][0].float().contiguous()}, path)
        return {}

NODE_CLASS_MAPPINGS = {
    "CQTestConditioning": CQTestConditioning,
    "CQTestSaveConditioning": CQTestSaveConditioning,
}
"""


def comfy_env() -> tuple[Path, Path] | None:
    """``(COMFYUI_DIR, COMFYUI_PYTHON)`` if both are set, else ``None``."""
    d, py = os.environ.get("COMFYUI_DIR"), os.environ.get("COMFYUI_PYTHON")
    return (Path(d), Path(py)) if d and py else None


def user_env() -> dict[str, str]:
    """This process's environment without the suite's Triton CPU interpreter: child processes
    (ComfyUI, our CLI) run as a user's would (tests/conftest.py sets TRITON_INTERPRET=1 for the
    kernel tests, and it is inherited)."""
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_random_model(kind: str, out: Path, *, seed: int = 0, hidden: int = 128) -> Path:
    """Write a random ``kind`` model (``flux``, ``t5-base``, ``qwen3-06b``) with ComfyUI's own
    classes, run by ComfyUI's Python (see make_random_model.py)."""
    env = comfy_env()
    assert env is not None
    subprocess.run(
        [str(env[1]), str(HERE / "make_random_model.py"), kind, str(out), "--seed", str(seed),
         "--hidden", str(hidden)],
        check=True, capture_output=True, env={**user_env(), "COMFYUI_DIR": str(env[0])},
    )  # fmt: skip
    return out


def make_tiny_flux(out: Path, *, seed: int = 0, hidden: int = 128) -> Path:
    """A tiny random Flux.1 (hidden 128, 2 double + 2 single blocks)."""
    return make_random_model("flux", out, seed=seed, hidden=hidden)


@dataclass
class ComfyServer:
    """A running ComfyUI; use as a context manager. ``with_pack=False`` starts it without us."""

    with_pack: bool = True
    extra_args: list[str] = field(default_factory=list)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cq-e2e-")))
    port: int = field(default_factory=free_port)
    startup_s: float | None = None
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def folder(self, name: str) -> Path:
        """A model folder (``diffusion_models``, ...) or ``output``/``input``."""
        return self.root / name

    @property
    def log(self) -> str:
        path = self.root / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> ComfyServer:
        env = comfy_env()
        assert env is not None, "COMFYUI_DIR / COMFYUI_PYTHON unset"
        comfy_dir, python = env
        nodes = self.root / "custom_nodes"
        nodes.mkdir(parents=True)
        (nodes / "cq_test_nodes").mkdir()
        (nodes / "cq_test_nodes" / "__init__.py").write_text(TEST_NODES)
        if self.with_pack:
            (nodes / "comfyui-quantizer").symlink_to(REPO, target_is_directory=True)
        lines = ["cq_e2e:", f"    base_path: {self.root}", "    is_default: true",
                 "    custom_nodes: custom_nodes"]  # fmt: skip
        for name in MODEL_FOLDERS:
            self.folder(name).mkdir()
            lines.append(f"    {name}: {name}")
        (self.root / "extra_models.yaml").write_text("\n".join(lines) + "\n")
        for name in ("output", "input", "temp", "user"):
            self.folder(name).mkdir(exist_ok=True)
        cmd = [
            str(python), "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
            "--output-directory", str(self.folder("output")),
            "--input-directory", str(self.folder("input")),
            "--temp-directory", str(self.folder("temp")),
            "--user-directory", str(self.folder("user")),
            "--extra-model-paths-config", str(self.root / "extra_models.yaml"),
            "--disable-auto-launch", *self.extra_args,
        ]  # fmt: skip
        started = time.monotonic()
        log = open(self.root / "server.log", "wb")
        self._proc = subprocess.Popen(
            cmd, cwd=comfy_dir, stdout=log, stderr=subprocess.STDOUT, env=user_env()
        )
        deadline = started + 90
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early:\n{self.log[-4000:]}")
            try:
                self.get("/system_stats")
                self.startup_s = time.monotonic() - started
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.25)
        self.__exit__(None, None, None)
        raise RuntimeError(f"ComfyUI did not answer in 90 s:\n{self.log[-4000:]}")

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
        if os.environ.get("CQ_E2E_KEEP") != "1":
            shutil.rmtree(self.root, ignore_errors=True)

    # -- HTTP ---------------------------------------------------------------------------------
    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, payload: dict[str, Any]) -> Any:
        req = urllib.request.Request(
            self.url + path, data=json.dumps(payload).encode(), method="POST",
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read()
            return json.loads(body) if body else None

    def run(
        self,
        graph: dict[str, Any],
        *,
        timeout: float = 300,
        on_event: Callable[[dict[str, Any]], None] | None = None,
    ) -> RunResult:
        """Queue ``graph`` (API format) and collect websocket events until it ends.

        ``on_event`` sees each event as it arrives (e.g. to press Cancel mid-run).
        """
        import websocket  # websocket-client (dev extra)

        client_id = uuid.uuid4().hex
        ws = websocket.create_connection(
            f"ws://127.0.0.1:{self.port}/ws?clientId={client_id}", timeout=timeout
        )
        try:
            try:
                queued = self.post("/prompt", {"prompt": graph, "client_id": client_id})
            except urllib.error.HTTPError as e:
                return RunResult(prompt_id=None, events=[], error=json.loads(e.read() or b"{}"))
            prompt_id = queued["prompt_id"]
            events: list[dict[str, Any]] = []
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                raw = ws.recv()
                if isinstance(raw, bytes):
                    continue  # preview images
                msg = json.loads(raw)
                data = msg.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                events.append(msg)
                if on_event is not None:
                    on_event(msg)
                if msg["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                    break
            else:
                raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")
        finally:
            ws.close()
        # ComfyUI sends execution_success before its worker files the history entry: wait.
        history: dict[str, Any] = {}
        deadline = time.monotonic() + 30
        while not history and time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}").get(prompt_id, {})
            if not history:
                time.sleep(0.05)
        return RunResult(prompt_id=prompt_id, events=events, history=history)


@dataclass
class RunResult:
    prompt_id: str | None
    events: list[dict[str, Any]]
    history: dict[str, Any] = field(default_factory=dict)
    error: dict[str, Any] | None = None

    @property
    def status(self) -> str:
        """``success``, ``error``, ``interrupted`` or ``rejected`` (refused by /prompt)."""
        if self.error is not None:
            return "rejected"
        last = self.events[-1]["type"] if self.events else ""
        return {"execution_success": "success", "execution_error": "error",
                "execution_interrupted": "interrupted"}.get(last, "unknown")  # fmt: skip

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [e["data"] for e in self.events if e["type"] == kind]

    def outputs(self, node_id: str) -> dict[str, Any]:
        return self.history.get("outputs", {}).get(node_id, {})


def sample_graph(
    unet_name: str, *, latent_prefix: str, seed: int = 0, weight_dtype: str = "default"
) -> dict[str, Any]:
    """UNETLoader(unet_name) -> one Euler step on a 64x64 Flux latent -> SaveLatent."""
    cond = {"seed": seed, "context_dim": 64, "pooled_dim": 32, "tokens": 8}
    sampler = {
        "model": ["1", 0], "seed": seed, "steps": 1, "cfg": 1.0, "sampler_name": "euler",
        "scheduler": "simple", "positive": ["2", 0], "negative": ["2", 0],
        "latent_image": ["3", 0], "denoise": 1.0,
    }  # fmt: skip
    return {
        "1": {
            "class_type": "UNETLoader",
            "inputs": {"unet_name": unet_name, "weight_dtype": weight_dtype},
        },
        "2": {"class_type": "CQTestConditioning", "inputs": cond},
        "3": {
            "class_type": "EmptySD3LatentImage",
            "inputs": {"width": 64, "height": 64, "batch_size": 1},
        },
        "4": {"class_type": "KSampler", "inputs": sampler},
        "5": {
            "class_type": "SaveLatent",
            "inputs": {"samples": ["4", 0], "filename_prefix": latent_prefix},
        },
    }


def read_latent(server: ComfyServer, prefix: str) -> Any:
    """The latent SaveLatent wrote for ``prefix`` (newest file), as a float32 tensor."""
    from safetensors.torch import load_file

    files = sorted(
        server.folder("output").glob(f"{prefix}*.latent"), key=lambda p: p.stat().st_mtime
    )
    assert files, f"no latent saved under {prefix}"
    return load_file(str(files[-1]))["latent_tensor"].float()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run our CLI in this test interpreter's environment."""
    return subprocess.run(
        [sys.executable, "-m", "comfyui_quantizer", *args],
        capture_output=True, text=True, env=user_env(),
    )  # fmt: skip
