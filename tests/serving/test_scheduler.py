"""The single-tenant scheduling policy (swap and resident modes) as a pure function."""

from jaxmoe.serving.scheduler import next_tenant, starving

WAIT = 1.0


def test_starving_is_the_oldest_other_tenant_past_the_wait():
  waiting = [("a", 0.0), ("b", 5.0), ("c", 1.0)]
  assert starving(waiting, "a", now=6.5, max_wait_s=WAIT) == "b"  # b waited 1.5 s; c (older) is behind b
  assert starving(waiting, "a", now=5.5, max_wait_s=WAIT) is None  # b, the first other tenant, waited 0.5 s
  assert starving([("a", 0.0)], "a", now=99.0, max_wait_s=WAIT) is None


def test_a_running_batch_keeps_its_tenant_until_another_starves():
  waiting = [("b", 0.0), ("a", 0.5)]
  assert next_tenant(waiting, running="a", active="a", now=0.8, max_wait_s=WAIT) == ("a", None)
  # b waited past the limit: admit nothing (the batch drains) and prefetch b
  assert next_tenant(waiting, running="a", active="a", now=2.0, max_wait_s=WAIT) == (None, "b")


def test_an_empty_batch_prefers_the_starving_then_the_loaded_then_the_oldest():
  waiting = [("b", 0.0), ("a", 0.5)]
  assert next_tenant(waiting, running=None, active="a", now=2.0, max_wait_s=WAIT) == ("b", None)
  assert next_tenant(waiting, running=None, active="a", now=0.6, max_wait_s=WAIT) == ("a", None)  # no switch
  assert next_tenant(waiting, running=None, active="c", now=0.6, max_wait_s=WAIT) == ("b", None)
  assert next_tenant(waiting, running=None, active=None, now=0.6, max_wait_s=WAIT) == ("b", None)
  assert next_tenant([], running=None, active="a", now=0.0, max_wait_s=WAIT) == (None, None)
