"""livecam: a microphone-driven talking avatar on a virtual webcam."""

__version__ = "0.1.0"
