"""The gateway's page proxy reaches page servers on a Unix socket or on
TCP at exactly `http://HOST:PORT` (a Pod's IP): anything else is refused."""
from __future__ import annotations

import pytest

from services.gateway.pages import _tcp_base


@pytest.mark.parametrize("address, base", [
    ("http://10.1.2.3:8888", "http://10.1.2.3:8888"),
    ("http://10.1.2.3:8888/", "http://10.1.2.3:8888"),
    ("http://[fd00::7]:8888", "http://[fd00::7]:8888"),
    ("unix:/run/nb.sock", ""),
    ("http://10.1.2.3", ""),               # no port
    ("http://10.1.2.3:8888/other", ""),    # a path
    ("http://u:p@10.1.2.3:8888", ""),      # credentials
    ("https://10.1.2.3:8888", ""),
    ("10.1.2.3:8888", ""),
])
def test_tcp_page_addresses(address, base):
    assert _tcp_base(address) == base
