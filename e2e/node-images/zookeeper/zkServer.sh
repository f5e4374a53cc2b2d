#!/bin/bash
# Stand-in for the official image's zkServer.sh, `start-foreground` only: the Debian package's
# server (its jar's manifest names its dependencies) on the generated zoo.cfg.
set -e
if [[ "$1" != "start-foreground" ]]; then
    echo "zkServer.sh stand-in: only start-foreground is supported (got: $*)" >&2
    exit 2
fi
exec java $JVMFLAGS "-Dzookeeper.log.dir=$ZOO_LOG_DIR" \
    -cp /usr/share/java/zookeeper.jar:/usr/share/java/slf4j-simple.jar \
    org.apache.zookeeper.server.quorum.QuorumPeerMain "$ZOO_CONF_DIR/zoo.cfg"
