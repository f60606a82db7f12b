"""Code pieces of exported scripts, as plain text. Each piece reads like hand-written code and
refers to the script's constants by name; ``engine.export.script`` picks the pieces a profile
needs and fills in constants. Nothing here is ever executed by Headroom itself."""

BUILTIN_TEXTS = '''
def load_texts():
    """Headroom's built-in sample corpus (build_corpus), its first TEXT_LIMIT texts."""
    return list(build_corpus())[:TEXT_LIMIT]
'''

TXT_LINES = '''
def load_texts():
    """One text per non-empty line of DATASET."""
    texts = []
    with open(DATASET, encoding="utf-8-sig") as fh:
        for line in fh:
            if line.strip():
                texts.append(line.strip())
                if len(texts) == TEXT_LIMIT:
                    break
    return texts
'''

TXT_PARAGRAPHS = '''
def load_texts():
    """One text per blank-line-separated paragraph of DATASET (lines joined with newlines)."""
    texts, block = [], []
    with open(DATASET, encoding="utf-8-sig") as fh:
        for line in list(fh) + [""]:
            if line.strip():
                block.append(line.rstrip())
            elif block:
                texts.append("\\n".join(block))
                block = []
                if len(texts) == TEXT_LIMIT:
                    break
    return texts
'''

CSV = '''
def load_texts():
    """The TEXT_COLUMN cells of DATASET (a header row names the columns); empty cells skipped."""
    csv.field_size_limit(2**31 - 1)  # long documents in one cell are normal
    texts = []
    with open(DATASET, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter=DELIMITER)
        column = [name.strip() for name in next(reader)].index(TEXT_COLUMN)
        for row in reader:
            if column < len(row) and row[column].strip():
                texts.append(row[column])
                if len(texts) == TEXT_LIMIT:
                    break
    return texts
'''

JSONL = '''
def load_texts():
    """The TEXT_COLUMN field of each JSON object in DATASET (one per line); empty values skipped."""
    texts = []
    with open(DATASET, encoding="utf-8-sig") as fh:
        for line in fh:
            if not line.strip():
                continue
            value = json.loads(line)
            if isinstance(value, dict):
                value = value.get(TEXT_COLUMN)
            elif TEXT_COLUMN is not None:
                continue
            if isinstance(value, str) and value.strip():
                texts.append(value)
                if len(texts) == TEXT_LIMIT:
                    break
    return texts
'''

PARQUET = '''
def load_texts():
    """The TEXT_COLUMN values of the Parquet file DATASET (needs pyarrow); empty values skipped."""
    import pyarrow.parquet as pq

    texts = []
    for batch in pq.ParquetFile(DATASET).iter_batches(batch_size=1024, columns=[TEXT_COLUMN]):
        for value in batch.column(0).to_pylist():
            if isinstance(value, str) and value.strip():
                texts.append(value)
                if len(texts) == TEXT_LIMIT:
                    return texts
    return texts
'''

FALLBACK_TOKENIZER = '''
def load_tokenizer():
    """Headroom's byte-level BPE, embedded at the end of this script (the preset has no tokenizer;
    memory depends on token counts, not on which tokens they are)."""
    backend = tokenizers.Tokenizer.from_str(lzma.decompress(base64.b64decode(FALLBACK_TOKENIZER_XZ)).decode())
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>", mask_token="<mask>", cls_token="<cls>", sep_token="<sep>")
    tokenizer.model_max_length = 1 << 30  # SEQ decides truncation
    return tokenizer
'''

FOLDER_TOKENIZER = '''
def load_tokenizer():
    """The model folder's own tokenizer, with a pad token (GPT-2-style tokenizers have none)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True{trust})
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({{"pad_token": "<pad>"}})
    return tokenizer
'''

# ----- batching: the plan is the engine's (engine.batching.plan_padded_batches) ---------------
MAKE_BATCHES = '''
def make_batches(token_lists, pad_token_id):
    """(input_ids, attention_mask) pairs, right-padded, in the order they are trained on."""
    lengths = [len(ids) for ids in token_lists]
    plan = #PLAN#  # [(rows, T)]
    batches = []
    for group, length in plan:
        input_ids = torch.full((len(group), length), pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(group), length), dtype=torch.long)  # (B, T)
        for row, i in enumerate(group):
            input_ids[row, :len(token_lists[i])] = torch.tensor(token_lists[i], dtype=torch.long)
            attention_mask[row, :len(token_lists[i])] = 1
        batches.append((input_ids, attention_mask))
    return batches
'''

# ----- memory (the live-bytes tracker itself is the engine's: engine.measure.probes) ----------
PEAK_MEMORY = '''
class PeakMemory:
    """Peak memory of everything the run creates after the baseline (the model, gradients,
    optimizer state, activations).

    CUDA: max_memory_allocated/reserved, what was allocated before the model subtracted, and the
    device's used memory (mem_get_info: the CUDA context included). CPU: live tensor bytes, the
    growth of the process's resident set and its peak."""

    def __init__(self, device):
        self.device = device
        gc.collect()
        if device.type == "cuda":
            torch.empty(0, device=device)  # create the CUDA context outside the measured region
            torch.cuda.empty_cache()
            #POOL#
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.base = torch.cuda.memory_allocated(device)
        else:
            self.tracker = LiveBytesTracker("cpu")  # the tracker of Headroom's CPU measure
            self.base = self.resident_peak = resident_bytes()

    def start(self, *models):
        """Begin the measured steps (CPU: count the weights, then every tensor the steps make)."""
        self.sync()
        if self.device.type == "cpu":
            for model in models:
                for tensor in list(model.parameters()) + list(model.buffers()):
                    self.tracker.track(tensor)
            self.tracker.__enter__()

    def stop(self):
        if self.device.type == "cpu":
            self.tracker.__exit__(None, None, None)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        else:
            self.resident_peak = max(self.resident_peak, resident_bytes())

    def result(self):
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            return {"peak_allocated_bytes": torch.cuda.max_memory_allocated(self.device) - self.base,
                    "peak_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
                    "device_used_bytes": total - free}
        return {"peak_allocated_bytes": self.tracker.peak_bytes,
                "peak_reserved_bytes": self.resident_peak - self.base,
                "device_used_bytes": self.resident_peak}


def resident_bytes():
    """This process's resident set size (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
'''
