"""Convert a random-weight Qwen2-MoE checkpoint (saved by peers_gpu.py) to GGUF with llama.cpp's own converter.

    python3 benchmarks/peers/gguf_convert.py --llama-cpp .carry/llama.cpp --model CKPT_DIR --out model.gguf

It imports the converter from the trimmed tree (convert_hf_to_gguf.py's `conversion` package and `gguf-py`) and runs
its Qwen2-MoE class, as convert_hf_to_gguf.py does, with one difference: the checkpoint carries finemoe's built-in
byte-level tokenizer (256 byte tokens and two specials; the rest of the 151,936-entry vocabulary are padding
entries), whose pre-tokenizer is not in the converter's table of known tokenizers (it identifies them by a hash of
one test string's token ids), so the subclass below names the pre-tokenizer 'default'. Tokenization plays no part in
llama-bench (it feeds random token ids); the tensors are converted by the converter's unchanged code.

Run it in its own process: it puts the tree's gguf-py first on sys.path.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

OUTTYPES = ("bf16", "f16", "f32")


def converter_class(tree: Path):
    """The vendored converter's Qwen2-MoE class, with the pre-tokenizer named 'default'."""
    sys.path[:0] = [str(tree), str(tree / "gguf-py")]
    from conversion import get_model_class

    base = get_model_class("Qwen2MoeForCausalLM")

    class ByteTokenizerQwen2Moe(base):
        model_arch = base.model_arch

        def get_vocab_base_pre(self, tokenizer) -> str:
            return "default"

    return ByteTokenizerQwen2Moe


def convert(tree: Path, model_dir: Path, out: Path, outtype: str = "bf16") -> float:
    """Write `out` (GGUF) from the safetensors checkpoint in `model_dir`; returns wall seconds."""
    import torch

    cls = converter_class(tree)
    import gguf

    ftype = {"bf16": gguf.LlamaFileType.MOSTLY_BF16, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "f32": gguf.LlamaFileType.ALL_F32}[outtype]
    t0 = time.perf_counter()
    with torch.inference_mode():
        cls(model_dir, ftype, out).write()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", required=True, help="the trimmed llama.cpp tree (prepare_llamacpp.py)")
    ap.add_argument("--model", required=True, help="a Qwen2MoeForCausalLM checkpoint directory (save_pretrained)")
    ap.add_argument("--out", required=True, help="the .gguf file to write")
    ap.add_argument("--outtype", default="bf16", choices=OUTTYPES)
    args = ap.parse_args(argv)
    tree, model_dir = Path(args.llama_cpp), Path(args.model)
    if not (tree / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"--llama-cpp {tree}: no convert_hf_to_gguf.py there; "
                         "run benchmarks/peers/prepare_llamacpp.py")
    if not (model_dir / "config.json").is_file():
        raise SystemExit(f"--model {model_dir}: no config.json there; save the model with save_pretrained first")
    seconds = convert(tree, model_dir, Path(args.out), args.outtype)
    print(f"converted {model_dir} -> {args.out} ({args.outtype}) in {seconds:.1f} s")


if __name__ == "__main__":
    main()
