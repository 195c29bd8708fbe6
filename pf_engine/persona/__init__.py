"""What a persona is: the adapter bank of LoRA experts (bank.py), the routers that weight them
(router.py), the user's persona specs turned into gate rows (specs.py), and the per-forward
mixing state every adapted layer reads (mix.py)."""
