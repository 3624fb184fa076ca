import gc

from phaul import gcpause


def test_pauses_nest_and_restore_the_collector() -> None:
    assert gc.isenabled()
    gcpause.pause()
    gcpause.pause()
    assert not gc.isenabled()
    gcpause.resume()
    assert not gc.isenabled()  # one pause still holds
    gcpause.resume()
    assert gc.isenabled()
    gcpause.resume()  # an extra resume is harmless
    assert gc.isenabled() and gcpause.depth() == 0


def test_a_collector_disabled_before_stays_disabled() -> None:
    gc.disable()
    try:
        gcpause.pause()
        gcpause.resume()
        assert not gc.isenabled()
    finally:
        gc.enable()
