//! The mesh file as a source of the desired model: read at start (a bad file fails start-up:
//! there is no last good state yet), then checked once a second off the data plane's worker
//! threads (`tokio::fs`, which reads on the blocking pool). A changed file is parsed, turned
//! into the model and applied; a bad, deleted or truncated file is logged once per change with
//! its line, counted (`config_reloads_total{result="error"}`), and the last good state stays.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tracing::{info, warn};

use crate::{
    meshfile::{self, MeshFile},
    metrics::Metrics,
    state::{
        State,
        desired::{AppProtocol, Desired, Endpoints, PortDesc, ServiceDesc, WorkloadDesc},
    },
};

/// How often the mesh file is checked for changes.
pub const POLL: Duration = Duration::from_secs(1);

/// The desired model a (validated) mesh file describes.
pub fn to_desired(f: &MeshFile) -> Desired {
    Desired {
        nodes: f.nodes.clone(),
        workloads: f
            .workloads
            .iter()
            .map(|w| WorkloadDesc {
                namespace: w.namespace.clone(),
                name: w.name.clone(),
                service_account: w.service_account.clone(),
                node: w.node.clone(),
                ip: w.ip,
                cgroup: w.cgroup.clone(),
                labels: w.labels.clone(),
                probe_ports: w.probe_ports.clone(),
                proxy_protocol_ports: w.proxy_protocol_ports.clone(),
                mode: w.mode,
            })
            .collect(),
        services: f
            .services
            .iter()
            .map(|s| ServiceDesc {
                namespace: s.namespace.clone(),
                name: s.name.clone(),
                vip: s.vip,
                ports: s
                    .ports
                    .iter()
                    .map(|p| PortDesc {
                        name: p.name.clone(),
                        port: p.port,
                        target_port: p.target(),
                        // Validated by `meshfile::parse`.
                        protocol: p
                            .app_protocol
                            .as_deref()
                            .and_then(|a| AppProtocol::parse(a).ok()),
                    })
                    .collect(),
                endpoints: Endpoints::Selector(s.selector.clone()),
            })
            .collect(),
        policies: f.authorization_policies.clone(),
        routes: f.routes.clone(),
    }
}

/// The mesh file, followed.
pub struct FileSource {
    path: PathBuf,
    state: Arc<State>,
    metrics: Arc<Metrics>,
    /// Text of the last file seen (good or bad), to notice changes.
    last_text: Option<String>,
    /// Why the file could not be read at the last poll: each new reason is logged and counted
    /// once, not every second.
    last_read_error: Option<String>,
}

impl FileSource {
    pub fn new(path: PathBuf, state: Arc<State>, metrics: Arc<Metrics>) -> Self {
        Self {
            path,
            state,
            metrics,
            last_text: None,
            last_read_error: None,
        }
    }

    /// The first load: without a good file there is no state to keep, so this is an error.
    pub fn load_initial(&mut self) -> Result<(), String> {
        let text = meshfile::read_file(&self.path).map_err(|e| {
            format!(
                "cannot read mesh file {}: {e}; pass --mesh-file with a readable file",
                self.path.display()
            )
        })?;
        self.apply(text)
    }

    /// Follows the file until the process ends.
    pub async fn run(mut self) {
        loop {
            tokio::time::sleep(POLL).await;
            self.poll().await;
        }
    }

    async fn poll(&mut self) {
        let path = self.path.clone();
        let read = tokio::task::spawn_blocking(move || meshfile::read_file(&path))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        match read {
            Ok(text) => {
                self.last_read_error = None;
                if self.last_text.as_deref() != Some(text.as_str())
                    && let Err(e) = self.apply(text)
                {
                    warn!(error = %e, "mesh file rejected; keeping the last good state");
                }
            }
            Err(e) => {
                let why = e.to_string();
                if self.last_read_error.as_deref() != Some(why.as_str()) {
                    warn!(path = %self.path.display(), error = %why, "cannot read the mesh file; keeping the last good state");
                    self.metrics
                        .config_reloads
                        .with_label_values(&["error"])
                        .inc();
                    self.last_read_error = Some(why);
                }
                self.last_text = None;
            }
        }
    }

    fn apply(&mut self, text: String) -> Result<(), String> {
        self.last_text = Some(text.clone());
        let result = meshfile::parse(&self.path, &text)
            .map_err(|e| e.to_string())
            .and_then(|file| self.state.apply(&to_desired(&file)));
        match result {
            Ok(snap) => {
                self.metrics.config_reloads.with_label_values(&["ok"]).inc();
                info!(path = %self.path.display(), workloads = snap.workloads_by_id.len(), service_ports = snap.services.len(), "mesh file loaded");
                Ok(())
            }
            Err(e) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&["error"])
                    .inc();
                Err(e)
            }
        }
    }
}
