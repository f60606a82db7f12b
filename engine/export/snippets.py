"""Code pieces of exported scripts, as plain text. Each piece reads like hand-written code and
refers to the script's constants by name; ``engine.export.script`` picks the pieces a profile
needs and fills in constants. Nothing here is ever executed by Headroom itself."""

BUILTIN_TEXTS = '''
def load_texts():
    """Headroom's built-in sample corpus (build_corpus), its first TEXT_LIMIT texts."""
    return list(build_corpus())[:TEXT_LIMIT]
'''

TXT = '''
def load_texts():
    """The first TEXT_LIMIT texts of DATASET: one per non-empty line, or per paragraph (TXT_MODE)."""
    with open(DATASET, encoding="utf-8-sig") as fh:
        return take_texts(txt_texts(bounded_lines(fh), TXT_MODE), TEXT_LIMIT)
'''

CSV = '''
def load_texts():
    """The first TEXT_LIMIT non-empty TEXT_COLUMN cells of DATASET (a header row names the columns)."""
    csv.field_size_limit(2**31 - 1)  # long documents in one cell are normal
    with open(DATASET, encoding="utf-8-sig", newline="") as fh:
        rows = csv.reader(fh, delimiter=DELIMITER)
        column = [name.strip() for name in next(rows)].index(TEXT_COLUMN)
        return take_texts(csv_texts(rows, column), TEXT_LIMIT)
'''

JSONL = '''
def load_texts():
    """The first TEXT_LIMIT non-empty texts of DATASET, one JSON record per line."""
    with open(DATASET, encoding="utf-8-sig") as fh:
        records = (json.loads(line) for line in fh if line.strip())
        return take_texts(jsonl_texts(records, TEXT_COLUMN, strings=#STRINGS#), TEXT_LIMIT)
'''

PARQUET = '''
def load_texts():
    """The first TEXT_LIMIT non-empty TEXT_COLUMN values of the Parquet file DATASET (needs pyarrow)."""
    import pyarrow.parquet as pq

    return take_texts(parquet_texts(pq.ParquetFile(DATASET), TEXT_COLUMN), TEXT_LIMIT)
'''

# ----- batching: the plan and the padding are the engine's (engine.batching) -----------------
MAKE_BATCHES = '''
def make_batches(token_lists, pad_token_id):
    """(input_ids, attention_mask) pairs, right-padded, in the order they are trained on."""
    lengths = [len(ids) for ids in token_lists]
    plan = #PLAN#  # [(rows, T)]
    return [pad_batch([list(token_lists[i]) for i in group], length, pad_token_id) for group, length in plan]
'''

# ----- memory: the tracker, the RSS sampler and the probes are the engine's (engine.measure.probes)
PEAK_MEMORY = '''
class PeakMemory:
    """Peak memory of everything the run creates after the baseline (the model, gradients,
    optimizer state, activations), read with Headroom's probes.

    CUDA (CudaProbe): peak allocated minus what was allocated before the model, peak reserved, and
    the device's used memory (mem_get_info: the CUDA context included). CPU (CpuProbe): live tensor
    bytes (LiveBytesTracker), the growth of the process's resident set and its peak (RssSampler)."""

    def __init__(self, device):
        self.device = device
        self.tracker = self.rss = None
        gc.collect()
        if device.type == "cuda":
            torch.empty(0, device=device)  # create the CUDA context outside the measured region
            torch.cuda.empty_cache()
            #POOL#
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.probe = CudaProbe(torch, device)
            self.probe.baseline = torch.cuda.memory_allocated(device)
        else:
            self.tracker = LiveBytesTracker("cpu")  # the tracker of Headroom's CPU measure
            self.rss = RssSampler()
            self.probe = CpuProbe(self.tracker, self.rss)

    def start(self, *models):
        """Begin the measured steps (CPU: count the weights, then every tensor the steps make)."""
        self.sync()
        if self.tracker is not None:
            for model in models:
                for tensor in list(model.parameters()) + list(model.buffers()):
                    self.tracker.track(tensor)
            self.rss.__enter__()
            self.tracker.__enter__()

    def stop(self):
        if self.tracker is not None:
            self.tracker.__exit__(None, None, None)
            self.rss.__exit__(None, None, None)

    def sync(self):
        self.probe.sync()
        if self.rss is not None:
            self.rss.sample()

    def result(self):
        end = self.probe.phase_end()  # the peaks since the baseline
        return {"peak_allocated_bytes": end.peak, "peak_reserved_bytes": end.peak_reserved,
                "device_used_bytes": self.probe.used()}
'''
