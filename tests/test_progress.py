"""The driver's progress bar (driver.progress.follow): an answer that comes late is drawn, not the end of the bar."""

import threading


class _Board:
    """Stands in for the ProgressBoard actor: ``take.remote()`` returns a ticket for ``ray.get``."""

    def __init__(self):
        self.take = self
        self.asked = 0

    def remote(self):
        self.asked += 1
        return self.asked


def test_a_late_answer_neither_ends_the_bar_nor_loses_its_lines(monkeypatch, capsys):
    import ray

    import dilm_ray.driver.progress as progress

    monkeypatch.setattr(progress, "POLL_SECONDS", 0.01)
    answers = {1: (3, {"loss": "2.0"}, ["[stage 3] loss=2.0"]), 2: (6, {}, ["[stage 6] loss=1.0"])}
    waits, late, finished = [], [True], threading.Event()

    def get(ticket, timeout=None):
        waits.append(ticket)
        if ticket == 1 and late[0]:  # the first answer misses its timeout once
            late[0] = False
            raise ray.exceptions.GetTimeoutError("slow")
        if ticket in answers:
            if ticket == 2:
                finished.set()
            return answers[ticket]
        return 6, {}, []

    monkeypatch.setattr(ray, "get", get)
    monkeypatch.setattr(ray, "kill", lambda handle: None)
    board = _Board()
    with progress.follow(board, "stage", 6):
        assert finished.wait(5), "the bar stopped polling after a late answer"
    out = capsys.readouterr()
    text = out.out + out.err
    assert waits[:2] == [1, 1]  # the late take() is waited on again, not asked anew (its lines would be lost)
    assert "[stage 3] loss=2.0" in text and "[stage 6] loss=1.0" in text and "6/6" in text
