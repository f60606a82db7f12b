"""Display units (binary: GiB, MiB). Engine results stay in raw bytes; convert only to show."""

GiB = 1024**3
MiB = 1024**2
KiB = 1024


def format_bytes(n: float) -> str:
    """12_884_901_888 -> '12.00 GiB'; binary units, two decimals."""
    sign = "-" if n < 0 else ""
    n = abs(float(n))
    # Literal sizes, no module names: the exported script embeds this function's source.
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{sign}{n / size:.2f} {unit}"
    return f"{sign}{int(n)} B"
