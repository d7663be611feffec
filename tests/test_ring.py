import numpy as np
import pytest

from livecam.audio.ring import AudioRing


def test_reads_by_absolute_index_across_wraparound():
    ring = AudioRing(10)
    stream = np.arange(37, dtype=np.float32)
    for start in range(0, 37, 7):  # blocks that straddle the wrap point
        ring.write(stream[start : start + 7])
    assert ring.end == 37 and ring.start == 27
    np.testing.assert_array_equal(ring.read(27, 37), stream[27:37])
    np.testing.assert_array_equal(ring.read(30, 33), stream[30:33])


def test_overwritten_and_future_spans_raise():
    ring = AudioRing(8)
    ring.write(np.ones(20, dtype=np.float32))
    with pytest.raises(IndexError, match="overwritten"):
        ring.read(5, 15)
    with pytest.raises(IndexError, match="only 20 captured"):
        ring.read(15, 21)


def test_negative_indices_read_as_silence():
    ring = AudioRing(8)
    ring.write(np.full(4, 2.0, dtype=np.float32))
    np.testing.assert_array_equal(ring.read(-3, 2), [0, 0, 0, 2, 2])


def test_block_larger_than_capacity_keeps_the_newest_samples():
    ring = AudioRing(5)
    ring.write(np.arange(12, dtype=np.float32))
    assert ring.end == 12
    np.testing.assert_array_equal(ring.read(7, 12), [7, 8, 9, 10, 11])


@pytest.mark.parametrize("before", [5, 13])  # 13: every slot holds old non-zero samples
@pytest.mark.parametrize("gap", [3, 8, 25])
def test_write_silence_advances_like_zeros(gap, before):
    ring, reference = AudioRing(8), AudioRing(8)
    for r in (ring, reference):
        r.write(np.arange(1, before + 1, dtype=np.float32))
    ring.write_silence(gap)
    reference.write(np.zeros(gap, dtype=np.float32))
    assert ring.end == reference.end
    np.testing.assert_array_equal(
        ring.read(ring.start, ring.end), reference.read(ring.start, ring.end)
    )


def test_shapes_dtypes_and_empty_spans():
    with pytest.raises(ValueError, match=r"^capacity must be positive$"):
        AudioRing(0)
    ring = AudioRing(8)
    ring.write(np.arange(1, 5, dtype=np.float64).reshape(4, 1))  # a (frames, 1) device block
    out = ring.read(0, 4)
    assert out.dtype == np.float32 and out.shape == (4,)
    np.testing.assert_array_equal(out, [1, 2, 3, 4])
    assert ring.read(2, 2).shape == (0,)  # an empty span is not an error
    with pytest.raises(ValueError, match="empty span"):
        ring.read(3, 2)


def test_one_sample_ring_and_the_first_overwritten_sample():
    ring = AudioRing(1)
    ring.write(np.array([3.0, 4.0], np.float32))
    np.testing.assert_array_equal(ring.read(1, 2), [4.0])
    ring = AudioRing(4)
    ring.write(np.arange(5, dtype=np.float32))  # sample 0 is gone, 1..4 held
    with pytest.raises(IndexError, match="overwritten"):
        ring.read(0, 5)


def test_the_ring_keeps_four_bytes_a_sample():
    # its memory is what the capacity promises: float32 storage, whatever the device delivers
    ring = AudioRing(16_000)
    ring.write(np.full(100, 0.1, dtype=np.float64))
    assert ring._buf.nbytes == 4 * 16_000
    np.testing.assert_array_equal(ring.read(0, 100), np.float32(0.1))
