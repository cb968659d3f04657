"""What the benchmarks share: the VisionArena-like workload (image sizes, questions) and the
markdown table they print."""

IMAGE_SIZES = [  # (width, height)
    (336, 336),
    (512, 512),
    (640, 480),
    (800, 600),
    (1024, 768),
    (1280, 720),
    (1920, 1080),
]
QUESTIONS = [
    "What is in this image?",
    "Describe the picture in detail.",
    "What color is the car?",
    "How many people are there?",
    "Is this a photo of a kitchen?",
]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table, as bench/RESULTS.md keeps them."""
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
