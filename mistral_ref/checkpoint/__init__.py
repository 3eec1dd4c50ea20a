"""Checkpoint I/O: native (params.json + consolidated*.safetensors) and Hugging Face (config.json +
model*.safetensors) checkpoints: load, save, convert.

Read in this order:

  names.py           the conversion itself: tensor names and the q/k row order (permute_qk)
  safetensors_io.py  one .safetensors file: check its header, read a tensor (or a slice) through a small reused
                     buffer, write a file atomically (temporary name, then rename)
  files.py           one checkpoint directory: its format, shards and index.json, and every tensor checked
                     against the config before a byte of weights is read (checkpoint_index)
  load.py            load_model: a meta-device model whose tensors are memory-map views or private copies
                     (load_weights, also used by mistral_ref.parallel to read each rank's slices)
  save.py            save_checkpoint, convert_checkpoint: one tensor at a time, sharded or not
  gguf.py            llama.cpp's GGUF files: load_gguf (load_model calls it for a .gguf file; names, metadata,
                     dequantization), save_gguf (F32/F16/BF16/Q8_0/Q4_0/...; the `gguf` extra)
  gguf_mistral4.py   what save_gguf writes for latent attention + fine-grained experts (llama.cpp's "mistral4")
  dtypes.py          parse_dtype ("bf16" -> torch.bfloat16) and dominant_dtype (the dtype holding most bytes)
  errors.py          CheckpointError: every message names the file, the key, what was expected and found

Loading reads only safetensors (never a pickle), checks every header against the config before touching a
byte, builds the model on the meta device and assigns tensors that are views of the files' memory maps (or,
when a tensor must be converted, read into private memory one at a time), so resident memory stays about one
copy of the weights.
"""

from mistral_ref.checkpoint.dtypes import dominant_dtype, parse_dtype
from mistral_ref.checkpoint.errors import CheckpointError
from mistral_ref.checkpoint.files import (
    CheckpointFiles,
    checkpoint_index,
    expected_shapes,
    find_checkpoint,
    read_model_args,
)
from mistral_ref.checkpoint.gguf import is_gguf_file, load_gguf, save_gguf
from mistral_ref.checkpoint.load import load_model, load_weights
from mistral_ref.checkpoint.names import (
    hf_to_native_name,
    is_qk,
    native_to_hf_name,
    permute_qk,
    permute_to_hf,
    permute_to_native,
    to_hf_tensor,
    to_native_tensor,
)
from mistral_ref.checkpoint.safetensors_io import TensorInfo, TensorSlice, read_safetensors_header, read_tensor
from mistral_ref.checkpoint.save import convert_checkpoint, copy_tokenizer_files, save_checkpoint
from mistral_ref.model import meta_model

__all__ = [
    "CheckpointError", "CheckpointFiles", "TensorInfo", "TensorSlice",
    "checkpoint_index", "convert_checkpoint", "copy_tokenizer_files", "dominant_dtype", "expected_shapes",
    "find_checkpoint", "hf_to_native_name", "is_gguf_file", "is_qk", "load_gguf", "load_model", "load_weights",
    "meta_model", "native_to_hf_name", "parse_dtype", "permute_qk", "permute_to_hf", "permute_to_native",
    "read_model_args", "read_safetensors_header", "read_tensor", "save_checkpoint", "save_gguf", "to_hf_tensor",
    "to_native_tensor",
]
