"""serving.follow on its own: a request keeps the service it began with through a swap, the old one retires
after its last request, and a reload that fails keeps the old one serving and is not retried at every look."""

from __future__ import annotations

import threading

from clip_pyfunc.promotion import Live
from clip_pyfunc.serving.follow import Current, Follower


def _settled(current: Current, retired: list, n: int) -> list:
    """`retired`, sorted (each service retires in the thread that let it go last)."""
    assert len(retired) == n, retired
    return sorted(retired)


def _live(n: int) -> Live:
    return Live(models={"text": f"models:/t/{n}", "image": f"models:/i/{n}"}, collection=f"shop-{n:012x}")


def test_a_request_finishes_on_the_service_it_began_with_and_the_old_one_retires_after_it():
    retired = []
    current = Current("A", on_retire=retired.append)
    with current.use() as first:
        current.swap("B")
        with current.use() as second:
            assert (first, second) == ("A", "B") and retired == []  # A still answers the first request
            assert current.services() == ["B", "A"]
    assert _settled(current, retired, 1) == ["A"] and current.services() == ["B"]
    current.swap("C")  # no request on B: retired at once
    assert _settled(current, retired, 2) == ["A", "B"]


def test_swaps_and_requests_from_many_threads_retire_each_service_once():
    retired, lock = [], threading.Lock()

    def retire(s):
        with lock:
            retired.append(s)

    current = Current(0, on_retire=retire)

    def requests():
        for _ in range(2000):
            with current.use():
                pass

    threads = [threading.Thread(target=requests) for _ in range(4)]
    for t in threads:
        t.start()
    for n in range(1, 200):
        current.swap(n)
    for t in threads:
        t.join()
    assert _settled(current, retired, 199) == list(range(199)) and current.service == 199


def test_a_failed_reload_keeps_serving_and_is_retried_after_a_while_or_when_asked():
    target = {"now": _live(1)}
    built = []

    def build(live):
        built.append(live.collection)
        if live.collection.endswith("2"):
            raise RuntimeError("the image model and the collection are of different spaces")
        return live.collection

    current = Current(_live(1).collection)
    follower = Follower(current, lambda: target["now"], build, serving=_live(1))
    assert follower.check()["changed"] is False and built == []
    target["now"] = _live(2)
    first = follower.check()
    assert first["changed"] is False and "different spaces" in first["error"] and current.service.endswith("1")
    again = follower.check()  # not loaded again at every look
    assert again["error"] == first["error"] and built == [_live(2).collection]
    follower.check(force=True)  # POST /admin/reload tries at once
    assert built == [_live(2).collection] * 2
    target["now"] = _live(1)  # rolled back to what serves: nothing to do, no error
    assert follower.check()["error"] is None
    target["now"] = _live(3)
    done = follower.check()
    assert done["changed"] and current.service == _live(3).collection and done["serving"]["collection"] == \
        _live(3).collection
