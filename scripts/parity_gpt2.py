"""Parity at full GPT-2 size, offline: a random 124M GPT2LMHeadModel written by transformers, loaded by gptlab.

    .venv/bin/python scripts/parity_gpt2.py

Prints the largest |logit difference| on 2x256 random tokens and whether 32 greedy tokens equal transformers'
`generate`. (The test suite checks the same properties on smaller models; this is the figure at real size.)
"""

import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gptlab import GPT

torch.manual_seed(0)
hf = GPT2LMHeadModel(GPT2Config()).eval()
with torch.no_grad():
    for param in hf.parameters():  # move every tensor (biases too) off its initial value
        param.add_(torch.randn_like(param) * 0.02)
tokens = torch.randint(0, 50257, (2, 256))
with tempfile.TemporaryDirectory() as directory:
    hf.save_pretrained(directory)
    ours = GPT.from_pretrained(directory)
with torch.no_grad():
    theirs_logits = hf(tokens).logits
    diff = (ours(tokens) - theirs_logits).abs().max().item()
print(f"logits: max |diff| {diff:.2e} (largest |logit| {theirs_logits.abs().max().item():.2f})")
prompt = tokens[:1, :8]
expected = hf.generate(
    prompt,
    attention_mask=torch.ones_like(prompt),
    max_new_tokens=32,
    do_sample=False,
    pad_token_id=0,
    eos_token_id=None,
)
print(
    "greedy, 32 tokens, equal to transformers generate:",
    torch.equal(ours.generate(prompt, 32, temperature=0.0), expected),
)
