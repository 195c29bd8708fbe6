"""The peers bench_generate runs beside pf_engine, on the same base weights and the same experts:
transformers, transformers + PEFT (experts combined by add_weighted_adapter "cat"), PEFT X-LoRA."""
from __future__ import annotations

import os


def hf_model(folder, device, dtype):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


def bank_to_peft(bank, folder: str, out_dir: str) -> list[str]:
    """Write each expert of ``bank`` as a PEFT LoRA folder (same A, B and scaling)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from pf_engine.model.config import HF_MODULE_NAMES
    dirs = []
    for k, name in enumerate(bank.expert_names):
        d = os.path.join(out_dir, f"expert{k}")
        os.makedirs(d)
        targets = [HF_MODULE_NAMES[m].split(".")[-1] for m in bank.expert_modules(k)]
        r = bank.ranks[k]
        LoraConfig(r=r, lora_alpha=bank.scalings[k] * r, target_modules=targets,
                   base_model_name_or_path=folder).save_pretrained(d)
        tensors = {}
        for l in range(bank.num_layers):
            for m in bank.expert_modules(k):
                lw = bank.lora(l, m)
                j = lw.expert_ids.tolist().index(k)
                r0, r1 = lw.rank_offsets[j].item(), lw.rank_offsets[j + 1].item()
                stem = f"base_model.model.model.layers.{l}.{HF_MODULE_NAMES[m]}"
                tensors[stem + ".lora_A.weight"] = lw.a[r0:r1].float().contiguous()
                tensors[stem + ".lora_B.weight"] = lw.b[:, r0:r1].float().contiguous()
        save_file(tensors, os.path.join(d, "adapter_model.safetensors"))
        dirs.append(d)
    return dirs


def peft_cat_model(folder, peft_dirs, names, weights: dict, device, dtype):
    """transformers + PEFT: the persona's experts combined by add_weighted_adapter(cat)."""
    from peft import PeftModel
    model = PeftModel.from_pretrained(hf_model(folder, device, dtype), peft_dirs[0],
                                      adapter_name=names[0])
    for d, n in zip(peft_dirs[1:], names[1:]):
        model.load_adapter(d, adapter_name=n)
    used = [n for n in names if weights.get(n, 0)]
    model.add_weighted_adapter(used, [weights[n] for n in used], adapter_name="persona",
                               combination_type="cat")
    model.set_adapter("persona")
    return model.eval()


def xlora_model(folder, peft_dirs, names, hidden_size, device, dtype, top_k=2):
    """PEFT X-LoRA over the same experts: per-token mixing by a (random) X-LoRA classifier,
    computed with PEFT's extra scaling pass and a Python loop over adapters."""
    from peft import XLoraConfig, get_peft_model
    cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=hidden_size, xlora_depth=1,
                      adapters={f"expert{i}": d for i, d in enumerate(peft_dirs)}, top_k_lora=top_k,
                      enable_softmax=False, enable_softmax_topk=True)
    model = hf_model(folder, device, dtype)
    model.config.use_cache = False
    return get_peft_model(model, cfg).eval()
