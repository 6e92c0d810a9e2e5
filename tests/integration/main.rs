//! Integration tests: the real gateway on 127.0.0.1:0 against in-process fake upstreams over
//! real sockets. One test binary, so the suite links once.

mod architecture;
mod auth;
mod cli;
mod cluster;
mod cluster_faults;
mod cluster_sources;
mod collapse;
mod common;
mod cors;
mod exhaustion;
mod held;
mod hostile;
mod http2;
mod jwt;
mod listeners;
mod longpoll;
mod ops;
mod properties;
mod proxy;
mod redis_server;
mod reload;
mod rest_sources;
mod sources;
