"""Cost of hashing DiT-XL/2's quantized weights as QuantPlan.digest does (669 MB of fp8 codes), before / after
dropping the bytes copy: ``python examples/digest_cost.py`` prints MB, then seconds (best of 3) and the hash of each way."""
import hashlib, time, torch
# DiT-XL/2's quantized linears as fp8 bytes: per block qkv(3) + out + ff1 + ff2 + adaLN (6x), hidden 1152
shapes = [(1152, 1152)] * 4 + [(4608, 1152), (1152, 4608), (6912, 1152)]
ts = {f"n{i}_{j}": torch.randint(0, 255, s, dtype=torch.uint8) for i in range(28) for j, s in enumerate(shapes)}
print("MB", sum(t.numel() for t in ts.values()) / 1e6)
for label, f in (("before", lambda t: t.contiguous().view(torch.uint8).numpy().tobytes()), ("after", lambda t: t.view(torch.uint8).numpy())):
    best = 1e9
    for _ in range(3):
        s = time.perf_counter(); h = hashlib.sha256()
        for k, t in sorted(ts.items()):
            h.update(k.encode()); h.update(f(t))
        best = min(best, time.perf_counter() - s)
    print(label, round(best, 3), h.hexdigest()[:16])
