"""Audio features per frame, computed from the ring: what the engines turn into mouths.

lite: spectral mouth shape and voicing per 20 ms hop (numpy). voice: a speech weight per frame
from those hops. whisper: MuseTalk's whisper-encoder windows (torch, the musetalk extra).
"""
