"""The unsharded Hugging Face model as the oracle for engine outputs."""

from __future__ import annotations

from pathlib import Path

import torch


def load_reference(path: Path):
    """HF model at fp32 with EOS switched off, as the engine's ``ignore_eos``.

    ``ignore_eos`` keeps EOS samplable; HF's ``min_new_tokens`` would mask it,
    so references built that way diverge whenever EOS is the true argmax.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    return model


def logprob_rows(model, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """HF's log-softmax over the vocabulary for each continuation token (fp32, [N, V])."""
    ids = torch.tensor([prompt + continuation])
    with torch.inference_mode():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
    return torch.log_softmax(logits, dim=-1)


def greedy_continuations(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Each prompt alone through HF ``generate``: its ``new_tokens`` greedy tokens."""
    outs = []
    for prompt in prompts:
        with torch.inference_mode():
            out = model.generate(
                torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
            )
        outs.append(out[0, len(prompt) :].tolist())
    return outs


def worst_greedy_logprob_error(engine, path: Path, prompts: list[list[int]]) -> float:
    """Worst |logprob - HF's| over 12 greedy tokens of ``prompts`` decoding together.

    HF runs in fp32 on the same bf16-rounded weights, so what remains is the engine's own
    bf16 arithmetic.
    """
    from dstp.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=0)
    results = engine.generate(prompts, params)
    hf = load_reference(path).to(torch.bfloat16).float()
    worst = 0.0
    for prompt, result in zip(prompts, results, strict=True):
        out = result.outputs[0]
        rows = logprob_rows(hf, prompt, out.token_ids)
        for row, token, lp in zip(rows, out.token_ids, out.logprobs, strict=True):
            worst = max(worst, abs(lp.logprob - row[token].item()))
    return worst
