from marathon.node.pool import refill_plan


def test_refill_never_exceeds_free_slots_or_target():
    assert refill_plan(target=2, slots=2, active=0, ready=0, filling=0) == 2
    assert refill_plan(target=2, slots=2, active=1, ready=0, filling=0) == 1
    assert refill_plan(target=2, slots=2, active=2, ready=0, filling=0) == 0
    assert refill_plan(target=2, slots=4, active=0, ready=1, filling=1) == 0
    assert refill_plan(target=5, slots=3, active=0, ready=1, filling=0) == 2
    assert refill_plan(target=0, slots=3, active=0, ready=0, filling=0) == 0
    assert refill_plan(target=2, slots=2, active=3, ready=0, filling=0) == 0
