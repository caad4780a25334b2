"""The three example recipes through the Python API, then the result loaded with PEFT.

Run after `make demo`:  .venv/bin/python examples/merge_api.py
"""

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import loramerge

DEMO = Path(__file__).resolve().parent.parent / "demo_out"
ADAPTERS = {name: DEMO / "adapters" / name for name in ("count", "colors", "animals", "code")}
OUT = DEMO / "api"

# 1. weighted sum, exact
exact = loramerge.merge(adapters=[ADAPTERS["count"], ADAPTERS["code"]], weights=[0.6, 0.4],
                        method="task_arithmetic", rank="exact", output=OUT / "weighted_sum", force=True)
# 2. TIES, truncated to rank 16 (each module's truncation error is in result.reports)
ties = loramerge.merge(adapters=list(ADAPTERS.values()), method="ties",
                       parameters={"density": 0.3}, rank=16, output=OUT / "ties_r16", force=True)
# 3. PEFT-compatible factor-wise TIES
peft_like = loramerge.merge(adapters=[ADAPTERS["count"], ADAPTERS["animals"]], weights=[0.5, 0.5], method="ties",
                            parameters={"density": 0.5}, factorwise=True, output=OUT / "peft_ties", force=True)

for result in (exact, ties, peft_like):
    print(f"{result.output.name:14} rank {result.total_rank:4}  max rel. error {result.max_rel_error:.3f}")

tokenizer = AutoTokenizer.from_pretrained(DEMO / "base")
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(DEMO / "base"), ties.output)
ids = tokenizer("one two three", return_tensors="pt")
with torch.no_grad():
    out = model.generate(**ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
print("ties_r16:", tokenizer.decode(out[0], skip_special_tokens=True))
