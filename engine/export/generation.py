"""The exported script's generation part (``--mode generate``): the engine's own prompt builder
(``engine.measure.generate.make_prompts``) and decode loop over transformers' cache classes
(``engine.measure.decode``), one generation per step with the prefill's and the decode's peaks read
apart, and ``main`` printing the keys of ``headroom measure --json`` last (kv_cache_bytes,
time_to_first_token_s, prefill_tokens_per_s, decode_tokens_per_s among them)."""

from __future__ import annotations

import inspect
import textwrap

from engine.profile import Profile

PHASE_PEAKS = '''
def phase_peaks(memory):
    """(peak allocated above the baseline, peak reserved) since the last call, then reset (the
    probe's phase end, as Headroom's measure reads it): the prefill's and the decode's peaks apart."""
    end = memory.probe.phase_end()
    return end.peak, end.peak_reserved
'''

GENERATE_ONCE = '''
def generate_once(model, input_ids, attention_mask, device, memory):
    """One generation with a new cache: greedy, NEW_TOKENS per sequence; its timings and peaks."""
    ids, mask = input_ids.to(device), attention_mask.to(device)
    memory.sync()
    phase_peaks(memory)
    marks = {}

    def on_token(i):
        if i == 0:  # the prefill is done: its peak, the time to the first token
            memory.sync()
            marks["first"] = time.perf_counter()
            marks["prefill"] = phase_peaks(memory)

    begin = time.perf_counter()
    cache = make_cache(model, CACHE, ids.shape[1] + NEW_TOKENS)
    #AUTOCAST#greedy_generate(model, ids, mask, cache, NEW_TOKENS, on_token)
    memory.sync()
    end = time.perf_counter()
    return {"ttft": marks["first"] - begin, "decode_s": end - marks["first"],
            "prefill": marks["prefill"], "decode": phase_peaks(memory),
            "kv_cache_bytes": cache_bytes(cache), "kv_cache_storage_bytes": cache_storage_bytes(cache)}
'''

MAIN = '''
def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="generations (the first is warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dry-run", action="store_true", help="build everything and generate once")
    return parser.parse_args()


def main():
    args = parse_args()
    started = time.perf_counter()
    device = torch.device(args.device)
    steps = 1 if args.dry_run else args.steps

    tokenizer = load_tokenizer()
    encoded = tokenizer(load_texts(), add_special_tokens=True, verbose=False)["input_ids"]
    input_ids, attention_mask = make_prompts(encoded, tokenizer.pad_token_id, BATCH, PROMPT_LEN, SEQ)

    memory = PeakMemory(device)  # the baseline: nothing of the model exists yet
    torch.manual_seed(SEED)
    model = build_model(device)
    input_ids = input_ids % model.config.vocab_size  # tokenizer ids beyond the model's vocabulary
    memory.start(model)
    runs = [generate_once(model, input_ids, attention_mask, device, memory) for _ in range(steps)]
    memory.stop()

    batch, prompt = input_ids.shape
    timed = runs[1:] or runs  # the first generation is warm-up
    ttft = statistics.median(r["ttft"] for r in timed)
    decode_s = statistics.median(r["decode_s"] for r in timed)
    decode_tps = batch * (NEW_TOKENS - 1) / decode_s if NEW_TOKENS > 1 and decode_s > 0 else 0.0
    prefill_peak = max(r["prefill"][0] for r in runs)
    decode_peak = max(r["decode"][0] for r in runs) if NEW_TOKENS > 1 else 0
    result = {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **memory.result(),
        "peak_allocated_bytes": max(prefill_peak, decode_peak),
        "peak_reserved_bytes": max(max(r["prefill"][1], r["decode"][1]) for r in runs),
        "kv_cache_bytes": runs[-1]["kv_cache_bytes"],
        "time_to_first_token_s": ttft,
        "prefill_tokens_per_s": batch * prompt / ttft,
        "decode_tokens_per_s": decode_tps,
        "step_time_s": decode_s / max(1, NEW_TOKENS - 1),
        "tokens_per_s": decode_tps,
        "useful_tokens_per_s": decode_tps,
        "real_tokens": int(attention_mask.sum()) + batch * NEW_TOKENS,
        "padded_tokens": batch * (prompt + NEW_TOKENS),
        "steps": steps,
        "params": sum(p.numel() for p in model.parameters()),
        "first_step_s": runs[0]["ttft"] + runs[0]["decode_s"],
        "distinct_shapes": 1,
        "losses": [],
        "loss": None,
        "extra": {"prefill_peak_allocated_bytes": prefill_peak,
                  "decode_peak_allocated_bytes": decode_peak,
                  "kv_cache_storage_bytes": runs[-1]["kv_cache_storage_bytes"],
                  "decode_tokens_per_s_per_sequence": decode_tps / batch,
                  "prompt_shape": [batch, prompt], "new_tokens": NEW_TOKENS, "cache": CACHE},
        "elapsed_s": time.perf_counter() - started,
    }
    print(json.dumps(result))
'''


def constants(s, profile: Profile) -> None:
    s.const("PROMPT_LEN", profile.prompt_len, "prompt tokens per sequence (0: the texts, cut at SEQ, "
            "left-padded)")
    s.const("NEW_TOKENS", profile.new_tokens, "tokens generated per sequence, greedy")
    s.const("CACHE", profile.cache, "transformers' DynamicCache (grows) or StaticCache (preallocated)")


def prompts_section() -> str:
    from engine.measure.generate import make_prompts

    return textwrap.dedent(inspect.getsource(make_prompts)).strip("\n")


def sections(s, profile: Profile) -> None:
    """The decode loop, one generation and ``main``."""
    from engine.measure import decode

    s.imports.add("import inspect")
    s.add("generation: transformers' cache classes and the greedy decode loop", decode.portable_source())
    once = GENERATE_ONCE
    if profile.precision in ("bf16-amp", "fp16-amp"):
        once = once.replace("#AUTOCAST#", "with torch.autocast(device.type, dtype=AUTOCAST_DTYPE):\n"
                                          "        ")
    else:
        once = once.replace("#AUTOCAST#", "")
    s.add("one generation", PHASE_PEAKS + "\n\n" + once)
    s.add("main", MAIN)


__all__ = ["constants", "prompts_section", "sections"]
