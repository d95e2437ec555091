//! QMP client: commands, replies and events over a unix socket.
