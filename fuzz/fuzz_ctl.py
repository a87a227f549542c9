"""atheris target: the control-socket protocol (`nicsplit.core.ctl`): any
request line decodes to a dict (a line that is no JSON object is ``{}``,
which each server answers "unknown command"); a reply encodes."""

import atheris

with atheris.instrument_imports():
    from nicsplit.core import ctl

from common import run


def test_one_input(data: bytes) -> None:
    req = ctl.decode_request(data)
    assert isinstance(req, dict), type(req)
    ctl.encode_reply({"ok": False, "error": str(req.get("cmd"))})


if __name__ == "__main__":
    run(test_one_input)
