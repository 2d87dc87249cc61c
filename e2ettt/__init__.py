"""e2ettt: how much quantization damage can score-first test-time training repair?"""

__version__ = "0.1.0"
