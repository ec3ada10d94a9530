"""Load a --output_format compressed-tensors export in vLLM's CPU backend and compare its greedy tokens with
transformers' on the same prompt. Not a CI test: it needs a vLLM install, which qwenvl-dq does not depend on.

    PYTHONPATH=/work/scratch/ct/tvshim /work/scratch/ct/venvvllm/bin/python scripts/vllm_cpu.py EXPORT_DIR

What the CPU backend needs (found by trying): a head_dim of 64 or more (its attention kernels; the default tiny
model's head_dim 16 is refused), so quantize a tiny model built with
    scripts/make_tiny_qwen2vl.py DIR --hidden_size 128 --num_attention_heads 2 --num_key_value_heads 1 \\
        --intermediate_size 256 --vision_embed_dim 128 --vision_num_heads 2
and text-only prompts (limit_mm_per_prompt 0: vLLM's Qwen2-VL image processor imports torchvision, which this
project never installs; the tvshim on PYTHONPATH serves the PIL image processor under the torchvision one's name so
that the model class imports at all). The prompt is a fixed list of token ids, so no tokenizer quirk enters.
Prints the W8A8 scheme vLLM picked for layer 0's linears, both runs' greedy tokens and prompt log-probabilities,
and how many greedy tokens agree.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: apply_model works
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # apply_model ships a function to the engine

PROMPT = [17, 42, 99, 123, 200, 7, 64, 301]


def transformers_run(path: str, n: int) -> tuple[list[int], list[float]]:
    """Greedy tokens and prompt log-probabilities from transformers (compressed-tensors' own forward), bf16."""
    import torch
    import transformers

    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(PROMPT):].tolist(), [round(float(lp[i, PROMPT[i + 1]]), 4) for i in range(len(PROMPT) - 1)]


def schemes(model) -> list[tuple]:
    """(module, linear class, scheme class, input_symmetric, parameters) of layer 0's quantized linears."""
    rows = []
    for name, m in model.named_modules():
        scheme = getattr(m, "scheme", None)
        if scheme is not None and ".layers.0." in name:
            params = {k: (str(v.dtype).replace("torch.", ""), list(v.shape))
                      for k, v in m.named_parameters(recurse=False)}
            rows.append((name, type(m).__name__, type(scheme).__name__, getattr(scheme, "input_symmetric", None),
                         params))
    return rows


def vllm_run(path: str, n: int) -> tuple[list[int], list[float]]:
    from vllm import LLM, SamplingParams

    llm = LLM(model=path, max_model_len=256, max_num_seqs=1, enforce_eager=True, dtype="bfloat16",
              quantization="compressed-tensors", limit_mm_per_prompt={"image": 0, "video": 0})
    for row in llm.apply_model(schemes)[0]:
        print("vllm module:", *row)
    out = llm.generate([{"prompt_token_ids": PROMPT}],
                       SamplingParams(max_tokens=n, temperature=0, prompt_logprobs=0))[0]
    prompt_lp = [round(d[t].logprob, 4) for d, t in zip(out.prompt_logprobs[1:], PROMPT[1:])]
    return list(out.outputs[0].token_ids), prompt_lp


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("export", help="a qwenvl-dq --output_format compressed-tensors directory")
    p.add_argument("--tokens", type=int, default=8, help="greedy tokens to generate (default: %(default)s)")
    a = p.parse_args()
    hf_tokens, hf_lp = transformers_run(a.export, a.tokens)
    vl_tokens, vl_lp = vllm_run(a.export, a.tokens)
    print("transformers greedy:", hf_tokens)
    print("vllm greedy:        ", vl_tokens)
    print("transformers prompt logprobs:", hf_lp)
    print("vllm prompt logprobs:        ", vl_lp)
    same = sum(x == y for x, y in zip(hf_tokens, vl_tokens))
    first = next((i for i, (x, y) in enumerate(zip(hf_tokens, vl_tokens)) if x != y), None)
    print(f"greedy tokens agreeing: {same}/{len(hf_tokens)}"
          + ("" if first is None else f" (first difference at token {first})"))
    print(f"prompt logprob max |diff|: {max(abs(x - y) for x, y in zip(hf_lp, vl_lp)):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
