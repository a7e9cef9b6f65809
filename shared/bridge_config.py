"""The Mosquitto bridge that joins a site broker to a regional one: control topics cross,
activation frames never do.

``bridged_topics()`` derives the list from the registry (shared/topics.py): every
control-plane topic, both ways, at its own QoS; data-plane topics (``plane="data"``)
stay on the site. deploy/mosquitto/bridge.conf.template holds the same list, written
out for operators to read; tests/service/test_bridge_config.py checks the two agree, so a
new topic cannot be forgotten. ``python -m shared.bridge_config --cluster C --site S
--regional HOST:PORT`` prints the rendered section for the site broker's config
(docs/DEPLOY.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shared.errors import ConfigError, InvalidId
from shared.ids import validate_id
from shared.topics import REGISTRY

TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "mosquitto" / "bridge.conf.template"
_PLACEHOLDER_CLUSTER = "CLUSTER"


def bridged_topics() -> list[tuple[str, int]]:
    """(filter under ``edgesplit/{cluster}/``, QoS) of every control-plane topic, sorted;
    parameters become ``+``."""
    prefix = f"edgesplit/{_PLACEHOLDER_CLUSTER}/"
    found = [(topic.filter(_PLACEHOLDER_CLUSTER).removeprefix(prefix), topic.qos)
             for topic in REGISTRY.values() if topic.plane == "control"]  # fmt: skip
    return sorted(found)


def local_topics() -> list[str]:
    """Filters of the data-plane topics, which never cross the bridge."""
    prefix = f"edgesplit/{_PLACEHOLDER_CLUSTER}/"
    return sorted(t.filter(_PLACEHOLDER_CLUSTER).removeprefix(prefix) for t in REGISTRY.values() if t.plane == "data")


def template_topics(text: str) -> list[tuple[str, int]]:
    """(filter, QoS) of the ``topic`` lines of a bridge config, sorted."""
    found = []
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["topic"]:
            found.append((words[1], int(words[3])))
    return sorted(found)


def render(cluster: str, site: str, regional: str, template: str | None = None) -> str:
    """The bridge section for a site broker. ``regional``: ``host:port`` of the regional
    broker. Raises ConfigError for a bad cluster, site or address."""
    try:
        validate_id(cluster, "cluster")
        validate_id(site, "site")
    except InvalidId as error:
        raise ConfigError(str(error)) from None
    host, _, port = regional.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or any(c.isspace() for c in host):
        raise ConfigError(f"--regional {regional!r}: expected HOST:PORT")
    text = template if template is not None else TEMPLATE.read_text()
    return text.format(cluster=cluster, site=site, regional_host=host, regional_port=port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.bridge_config",
                                     description="Print the Mosquitto bridge section of a site broker.")  # fmt: skip
    parser.add_argument("--cluster", required=True)
    parser.add_argument("--site", required=True, help="this site's name (the bridge's client id)")
    parser.add_argument("--regional", required=True, help="the regional broker, HOST:PORT")
    args = parser.parse_args(argv)
    try:
        print(render(args.cluster, args.site, args.regional), end="")
    except ConfigError as error:
        print(f"bridge_config: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
