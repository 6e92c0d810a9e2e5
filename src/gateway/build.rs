//! Building a [`Gateway`] from a configuration: each route's runtime, its authorization and
//! metrics, the upstream clients; on a reload, which routes keep their state (compared by
//! [`Fingerprint`]) and which are retired; and starting a new topic's source task.

use super::*;

/// What must be equal between two configs for a reload to keep a route's state: the route's
/// own settings, the upstreams it uses, and the global settings its runtime reads. Compared by
/// value (never logged: upstream headers carry credentials).
#[derive(PartialEq)]
pub(super) struct Fingerprint {
    route: RouteConfig,
    upstreams: Vec<UpstreamConfig>,
    max_message_bytes: usize,
    drain_window: Duration,
}

/// An upstream as the fingerprint sees it: its header values (credentials, all sensitive)
/// replaced by one placeholder, so that rotating a credential keeps a route's state, as it did
/// when fingerprints were `Debug` text (which prints sensitive values as `Sensitive`).
fn without_credentials(upstream: &UpstreamConfig) -> UpstreamConfig {
    let mut masked = upstream.clone();
    for (_, value) in &mut masked.headers {
        *value = http::HeaderValue::from_static("");
    }
    masked
}

fn fingerprint(config: &Config, route: &RouteConfig) -> Fingerprint {
    let mut used = Vec::new();
    let hook = |auth: &AuthConfig| match auth {
        AuthConfig::Hook(h) => Some(h.upstream),
        AuthConfig::Public | AuthConfig::Jwt(_) => None,
    };
    match &route.kind {
        RouteKind::Proxy { upstream } => used.push(*upstream),
        RouteKind::Poll(p) => {
            match &p.source {
                SourceConfig::UpstreamPoll { upstream, .. }
                | SourceConfig::UpstreamStream { upstream, .. }
                | SourceConfig::UpstreamInterval { upstream, .. } => used.push(*upstream),
                SourceConfig::Publish => {}
            }
            used.extend(hook(&p.auth));
        }
        RouteKind::Collapse(c) => {
            used.push(c.upstream);
            used.extend(hook(&c.auth));
        }
    }
    Fingerprint {
        route: route.clone(),
        upstreams: used
            .iter()
            .map(|&u| without_credentials(&config.upstreams[u]))
            .collect(),
        max_message_bytes: config.limits.max_message_bytes,
        drain_window: config.shutdown.drain_window,
    }
}

impl Gateway {
    /// The gateway serving `config`. With `previous` (a reload), every route whose
    /// `fingerprint` is unchanged keeps its state: topics, sources, stored answers, cached
    /// authorization decisions.
    pub fn new(
        config: &Config,
        metrics: &Arc<Metrics>,
        shared: Arc<Shared>,
        previous: Option<&Gateway>,
    ) -> Gateway {
        let fingerprints: Vec<Fingerprint> = config
            .routes
            .iter()
            .map(|r| fingerprint(config, r))
            .collect();
        let kept = |i: usize| {
            let previous = previous?;
            let name = &config.routes[i].name;
            let j = previous.routes.iter().position(|r| r.name == *name)?;
            (previous.fingerprints[j] == fingerprints[i]).then_some(j)
        };
        let route_metrics: Vec<_> = config
            .routes
            .iter()
            .map(|r| Arc::new(RouteMetrics::new(metrics, &r.name, r.kind.label())))
            .collect();
        let upstreams: Vec<_> = config
            .upstreams
            .iter()
            .cloned()
            .map(|u| Arc::new(Upstream::new(u)))
            .collect();
        let runtimes = config
            .routes
            .iter()
            .zip(&route_metrics)
            .enumerate()
            .map(
                |(i, (r, route_metrics))| match (&r.kind, kept(i).zip(previous)) {
                    (RouteKind::Poll(_), Some((j, previous))) => match &previous.runtimes[j] {
                        Runtime::Poll(p) => Runtime::Poll(p.clone()),
                        _ => unreachable!("an equal fingerprint is the same kind"),
                    },
                    (RouteKind::Collapse(_), Some((j, previous))) => match &previous.runtimes[j] {
                        Runtime::Collapse(c) => Runtime::Collapse(c.clone()),
                        _ => unreachable!("an equal fingerprint is the same kind"),
                    },
                    (RouteKind::Poll(p), _) => Runtime::Poll(Arc::new(PollRoute::new(
                        &r.name,
                        p,
                        PollMetrics::new(metrics, &r.name),
                        // Cluster mode: every poll route's topics mirror the backplane.
                        shared.backplane.clone(),
                    ))),
                    (RouteKind::Collapse(c), _) => Runtime::Collapse(Arc::new(CollapseRoute::new(
                        (**c).clone(),
                        CollapseMetrics::new(metrics, &r.name),
                        route_metrics.clone(),
                        upstreams[c.upstream].clone(),
                        config.limits.max_message_bytes,
                        shared.drain.clone(),
                        config.shutdown.drain_window,
                    ))),
                    (RouteKind::Proxy { upstream }, _) => Runtime::Proxy(*upstream),
                },
            )
            .collect();
        let auth = config
            .routes
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let (auth, topic, cursor) = match &r.kind {
                    RouteKind::Poll(p) => (&p.auth, &p.topic, Some(longpoll::CURSOR_PARAM)),
                    RouteKind::Collapse(c) => (&c.auth, &c.topic, c.cursor.as_deref()),
                    RouteKind::Proxy { .. } => return None,
                };
                match auth {
                    AuthConfig::Public => None,
                    // A kept route keeps its hook's cached decisions.
                    AuthConfig::Hook(_) if let Some((j, previous)) = kept(i).zip(previous) => {
                        previous.auth[j].clone()
                    }
                    AuthConfig::Hook(hook) => Some(Authorizer::Hook(Arc::new(Hook::new(
                        &r.name,
                        hook.clone(),
                        topic.clone(),
                        cursor.map(str::to_owned),
                        upstreams[hook.upstream].clone(),
                        metrics,
                    )))),
                    // Verifiers are rebuilt on every reload, so a key file rotated in place
                    // takes effect.
                    AuthConfig::Jwt(jwt) => Some(Authorizer::Jwt(Arc::new(Jwt::new(
                        &r.name,
                        jwt.clone(),
                        topic.clone(),
                    )))),
                }
            })
            .collect();
        let client_polls = match previous {
            Some(p) if p.limits.max_polls_per_client == config.limits.max_polls_per_client => {
                p.client_polls.clone()
            }
            _ => Arc::new(ClientPolls::new(config.limits.max_polls_per_client)),
        };
        Gateway {
            router: Router::new(&config.routes),
            route_metrics,
            runtimes,
            auth,
            unmatched: Arc::new(RouteMetrics::new(metrics, ROUTE_UNMATCHED, "none")),
            upstreams,
            routes: config.routes.clone(),
            fingerprints,
            limits: config.limits.clone(),
            shared,
            client_polls,
            drain_window: config.shutdown.drain_window,
        }
    }

    /// After a reload to `next`: the topics of every poll route `next` does not keep (removed
    /// or changed) are retired, so their held polls answer now and their sources stop. Returns
    /// the names of the routes that were not kept.
    pub fn retire_replaced(&self, next: &Gateway) -> Vec<String> {
        let mut replaced = Vec::new();
        for (route, runtime) in self.routes.iter().zip(&self.runtimes) {
            let kept = next.runtimes.iter().any(|n| match (runtime, n) {
                (Runtime::Poll(a), Runtime::Poll(b)) => Arc::ptr_eq(a, b),
                (Runtime::Collapse(a), Runtime::Collapse(b)) => Arc::ptr_eq(a, b),
                _ => false,
            });
            if kept {
                continue;
            }
            match runtime {
                Runtime::Poll(poll) => {
                    let topics = self.shared.hub.retire_route(&poll.topics);
                    tracing::debug!(route = %route.name, topics, "retired the route's topics");
                }
                Runtime::Collapse(collapse) => collapse.retire(),
                Runtime::Proxy(_) => {}
            }
            replaced.push(route.name.clone());
        }
        replaced
    }

    /// Starts the source of a topic a poll just created (upstream sources only). The source is
    /// built from config and the validated parameters alone. In cluster mode the topic is
    /// loaded from the backplane, and its source runs on whichever node holds its lease.
    pub(super) fn start_source(
        &self,
        poll: &PollRoute,
        route: usize,
        topic: Arc<Topic>,
        params: &[(String, String)],
    ) {
        let backplane = self.shared.backplane.as_ref().filter(|_| topic.mirrored());
        if let Some(b) = backplane {
            b.load(topic.clone());
        }
        let Some(make) = self.source_maker(poll, route, &topic, params) else {
            return;
        };
        let source: Pin<Box<dyn Future<Output = ()> + Send>> = match backplane {
            Some(b) => Box::pin(leased::run(b.clone(), topic.clone(), make)),
            None => make(Sink::Topic, None),
        };
        let slots = self.shared.sources.clone();
        let route_name = poll.name.clone();
        // Everything the source logs names its route and topic.
        let span =
            tracing::warn_span!(parent: None, "source", route = %route_name, topic = %topic.name());
        tokio::spawn(
            async move {
                let name = topic.name().to_owned();
                slots
                    .run_exclusive(&route_name, &name, topic.retired(), source)
                    .await;
            }
            .instrument(span),
        );
    }

    /// What builds the topic's upstream source for a sink and a resume point (none for a
    /// publish route).
    fn source_maker(
        &self,
        poll: &PollRoute,
        route: usize,
        topic: &Arc<Topic>,
        params: &[(String, String)],
    ) -> Option<leased::MakeSource> {
        let feed = {
            let (topic, poll_metrics) = (topic.clone(), poll.metrics.clone());
            let route_metrics = self.route_metrics[route].clone();
            let connects = self.shared.source_connects.clone();
            let (grace, max_bytes) = (poll.config.upstream_grace, self.limits.max_message_bytes);
            move |upstream: Arc<crate::upstream::Upstream>, sink: Sink| Feed {
                upstream,
                topic: topic.clone(),
                upstream_grace: grace,
                max_message_bytes: max_bytes,
                poll_metrics: poll_metrics.clone(),
                route_metrics: route_metrics.clone(),
                connects: connects.clone(),
                retry_after: Default::default(),
                recoveries_seen: Default::default(),
                ended_empty: Default::default(),
                sink,
            }
        };
        match &poll.config.source {
            SourceConfig::Publish => None,
            SourceConfig::UpstreamStream {
                format,
                upstream,
                path,
                idle_timeout,
            } => {
                let (format, idle_timeout) = (format.clone(), *idle_timeout);
                let (path, upstream) =
                    (path.render_path(params), self.upstreams[*upstream].clone());
                let initial = match &format {
                    StreamFormat::Ndjson {
                        initial_cursor: Some(i),
                        ..
                    } => Some(Initial::for_topic(i, params)),
                    _ => None,
                };
                Some(Box::new(move |sink, resume_from| {
                    Box::pin(
                        StreamSource {
                            format: format.clone(),
                            path: path.clone(),
                            idle_timeout,
                            resume_from,
                            initial: initial.clone(),
                            feed: feed(upstream.clone(), sink),
                        }
                        .run(),
                    )
                }))
            }
            SourceConfig::UpstreamInterval {
                upstream,
                path,
                interval,
                interval_header,
            } => {
                let (interval, interval_header) = (*interval, interval_header.clone());
                let (path, upstream) =
                    (path.render_path(params), self.upstreams[*upstream].clone());
                Some(Box::new(move |sink, resume_from| {
                    Box::pin(
                        IntervalSource {
                            path: path.clone(),
                            interval,
                            interval_header: interval_header.clone(),
                            resume_from,
                            feed: feed(upstream.clone(), sink),
                        }
                        .run(),
                    )
                }))
            }
            SourceConfig::UpstreamPoll {
                upstream,
                path,
                id_pointer,
                items_pointer,
                next_pointer,
                min_interval,
                initial_cursor,
            } => {
                let initial = initial_cursor
                    .as_ref()
                    .map(|i| Initial::for_topic(i, params));
                let (path, params) = (path.clone(), params.to_vec());
                let (id_pointer, items_pointer) = (id_pointer.clone(), items_pointer.clone());
                let (next_pointer, min_interval) = (next_pointer.clone(), *min_interval);
                let upstream = self.upstreams[*upstream].clone();
                Some(Box::new(move |sink, resume_from| {
                    Box::pin(
                        PollSource {
                            path: path.clone(),
                            params: params.clone(),
                            id_pointer: id_pointer.clone(),
                            items_pointer: items_pointer.clone(),
                            next_pointer: next_pointer.clone(),
                            min_interval,
                            initial: initial.clone(),
                            resume_from: resume_from.unwrap_or_default(),
                            feed: feed(upstream.clone(), sink),
                        }
                        .run(),
                    )
                }))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reload keeps a route's state exactly when what it depends on is equal by value.
    #[test]
    fn fingerprints_compare_what_a_route_depends_on() {
        let text = |hold: &str, pattern: &str, header: &str| {
            format!(
                "[listeners.p]\naddress = \"127.0.0.1:0\"\n\
                 [upstreams.u]\nurl = \"http://127.0.0.1:1\"\nheaders = {{ x-key = \"{header}\" }}\n\
                 [upstreams.other]\nurl = \"http://127.0.0.1:2\"\n\
                 [routes.feed]\npath = \"/feed/{{id}}\"\nkind = \"poll\"\nauth = \"public\"\n\
                 hold = \"{hold}\"\nparams.id = \"{pattern}\"\n\
                 source = {{ type = \"upstream-sse\", upstream = \"u\", path = \"/s/{{id}}\" }}\n"
            )
        };
        let print = |t: String| {
            let c = Config::from_toml(&t, std::path::Path::new(".")).unwrap();
            fingerprint(&c, &c.routes[0])
        };
        let base = print(text("5s", "[0-9]+", "a"));
        assert!(base == print(text("5s", "[0-9]+", "a")), "the same config");
        assert!(
            base != print(text("6s", "[0-9]+", "a")),
            "the route's own setting"
        );
        assert!(
            base != print(text("5s", "[0-9]{1,3}", "a")),
            "a parameter pattern"
        );
        // A rotated credential keeps the route, as before (header values are not compared).
        assert!(
            base == print(text("5s", "[0-9]+", "b")),
            "its upstream's header value"
        );
        let renamed = text("5s", "[0-9]+", "a").replace("x-key", "x-other");
        assert!(base != print(renamed), "its upstream's header name");
        let other_changed = text("5s", "[0-9]+", "a").replace("127.0.0.1:2", "127.0.0.1:3");
        assert!(base == print(other_changed), "an upstream it does not use");
    }
}
