"""A real `mlflow server` for tests, started through the project's own `mlflow/server.sh` on a free loopback port.

Not a test module: imported by tests/test_registry*.py, test_lineage*.py and test_mlflow_server*.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """`mlflow/server.sh` with a SQLite store and an artifact root under `root`; `auth` turns basic auth on."""

    def __init__(self, root: Path, port: int | None = None, auth_admin_password: str | None = None, workers: int = 1):
        self.root = root
        self.port = port or free_port()
        self.auth_admin_password = auth_admin_password
        self.workers = workers
        self.process: subprocess.Popen[bytes] | None = None
        self.log = root / "server.log"

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "SDFT_"))}
        env |= {
            "MLFLOW_PORT": str(self.port),
            "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{self.root / 'mlflow.db'}",
            "MLFLOW_ARTIFACTS_DESTINATION": str(self.root / "artifacts"),
            "MLFLOW_WORKERS": str(self.workers),
        }
        if self.auth_admin_password:
            config = self.root / "basic_auth.ini"
            text = (REPO / "mlflow" / "basic_auth.ini").read_text()
            config.write_text(text.replace("sqlite:///mlflow/basic_auth.db", f"sqlite:///{self.root / 'auth.db'}"))
            env |= {
                "MLFLOW_AUTH": "1",
                "MLFLOW_AUTH_CONFIG_PATH": str(config),
                "MLFLOW_AUTH_ADMIN_PASSWORD": self.auth_admin_password,
                "MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-secret",  # else server.sh writes one into mlflow/
            }
        return env

    def start(self, timeout: float = 180) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            # Its own process group: the server starts workers and job runners, all stopped together.
            self.process = subprocess.Popen(
                ["bash", str(REPO / "mlflow" / "server.sh")],
                env=self.environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.process.returncode}):\n{self.log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server not up after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        # Workers and job runners of the group may outlive the leader by a moment; make sure the port is free.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process = None


def client_env(uri: str) -> dict[str, str]:
    """Settings for code under test: this server, quick failures, short registry backoff."""
    return {
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
        "SDFT_REGISTRY_ATTEMPTS": "3",
        "SDFT_REGISTRY_BACKOFF_S": "0.2",
    }


def save_test_adapter(base_model: Path, out: Path, seed: int = 0) -> Path:
    """A small LoRA on the tiny UNet's attention, saved as diffusers writes one (seconds, no training)."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(base_model / "unet")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for name, param in unet.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)  # LoRA B starts at zero: make the adapter change something
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=layers, safe_serialization=True)
    return out


class Tap:
    """A TCP forwarder in front of a server that runs `action` once, just before forwarding the first request whose
    bytes contain `trigger`: a way to make something happen at an exact point of another process's conversation
    with MLflow (e.g. a person moving an alias while a flow registers its version)."""

    def __init__(self, target_port: int, trigger: bytes, action: Callable[[], None]) -> None:
        self.target, self.trigger, self.action = target_port, trigger, action
        self.fired = threading.Event()
        self.errors: list[BaseException] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pump, args=(downstream, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, downstream, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        try:
            while data := source.recv(65536):
                if from_client and self.trigger in data:
                    with self._lock:
                        if not self.fired.is_set():
                            try:
                                self.action()
                            except BaseException as exc:  # noqa: BLE001 - reported by the test
                                self.errors.append(exc)
                            self.fired.set()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.listener.close()
