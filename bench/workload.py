"""The VisionArena-like workload shared by the benchmarks: image sizes and questions."""

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
