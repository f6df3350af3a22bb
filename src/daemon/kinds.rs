//! The two kinds of daemon and the `main` of each: a stage around a handler (kop-payment,
//! kop-inventory, kop-notification) and the order API (kop-order).

use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, RwLock};

use sd_notify::NotifyState;
use tracing::{error, info, warn};

use super::process::EX_FAILURE;
use super::runner::{Kind, Life, daemon_main};
use crate::config::{
    Common, ConfigError, OrderConfig, ProcessEnv, Service, SimulateConfig, StageConfig,
};
use crate::lifecycle::notify;
use crate::metrics::Metrics;
use crate::stage::{Handler, Stage};

/// A reload applies the log level (and a stage's `[simulate]`); what else changed waits
/// for a restart, and the operator is told so.
fn not_applied(sections: &[&str]) {
    if !sections.is_empty() {
        warn!(
            sections = %sections.join(", "),
            "changed settings that apply only at a restart were not applied; restart to apply them"
        );
    }
}

/// kop-payment, kop-inventory and kop-notification: a [`Stage`] around a handler.
struct StageKind {
    service: Service,
    handler: Arc<dyn Handler>,
    /// `[simulate]`, which SIGHUP changes while the stage runs.
    simulate: Arc<RwLock<SimulateConfig>>,
}

impl Kind for StageKind {
    type Config = StageConfig;
    type Connected = Stage;
    type Error = crate::stage::StageError;

    fn service(&self) -> Service {
        self.service
    }

    fn label(&self) -> &str {
        self.handler.stage()
    }

    fn load(&self, path: Option<&Path>) -> Result<StageConfig, ConfigError> {
        StageConfig::load(self.service, path, &ProcessEnv)
    }

    fn common(config: &StageConfig) -> &Common {
        &config.common
    }

    fn configured(&self, config: &StageConfig) {
        if let Ok(mut current) = self.simulate.write() {
            *current = config.common.simulate.clone();
        }
    }

    fn reloaded(&self, running: &StageConfig, fresh: &StageConfig) {
        if let Ok(mut current) = self.simulate.write() {
            *current = fresh.common.simulate.clone();
        }
        let s = &fresh.common.simulate;
        info!(
            level = %fresh.common.log.level,
            simulate.failure_rate = s.failure_rate,
            simulate.delay = %humantime::format_duration(s.delay),
            simulate.stall = s.stall,
            "configuration reloaded"
        );
        not_applied(&running.needs_restart(fresh));
    }

    async fn connect(
        &self,
        config: &StageConfig,
        metrics: &Arc<Metrics>,
    ) -> Result<Stage, crate::stage::StageError> {
        Stage::connect(
            config.clone(),
            self.handler.clone(),
            metrics.clone(),
            self.simulate.clone(),
        )
        .await
    }

    async fn run(&self, stage: Stage, config: &StageConfig, life: Life) -> ExitCode {
        life.health.set_ready(true);
        notify(&[
            NotifyState::Ready,
            NotifyState::Status(&stage.running_line()),
        ]);
        info!(input = %config.input, retry = %config.retry_topic, dlq = %config.dlq_topic, output = ?config.output, group = %config.group_id, "ready");
        match stage.run(life.shutdown, life.health).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                error!(error = %e, "stage failed");
                ExitCode::from(EX_FAILURE)
            }
        }
    }
}

/// kop-order: the order API.
struct OrderKind;

impl Kind for OrderKind {
    type Config = OrderConfig;
    type Connected = Arc<crate::order::OrderApi>;
    type Error = rdkafka::error::KafkaError;

    fn service(&self) -> Service {
        Service::Order
    }

    fn label(&self) -> &str {
        "order"
    }

    fn load(&self, path: Option<&Path>) -> Result<OrderConfig, ConfigError> {
        OrderConfig::load(path, &ProcessEnv)
    }

    fn common(config: &OrderConfig) -> &Common {
        &config.common
    }

    fn reloaded(&self, running: &OrderConfig, fresh: &OrderConfig) {
        info!(level = %fresh.common.log.level, "configuration reloaded");
        not_applied(&running.needs_restart(fresh));
    }

    async fn connect(
        &self,
        config: &OrderConfig,
        metrics: &Arc<Metrics>,
    ) -> Result<Arc<crate::order::OrderApi>, rdkafka::error::KafkaError> {
        crate::order::OrderApi::connect(config.clone(), metrics.clone()).await
    }

    async fn run(
        &self,
        api: Arc<crate::order::OrderApi>,
        config: &OrderConfig,
        life: Life,
    ) -> ExitCode {
        let listener = match crate::serve::bind(config.listen).await {
            Ok(listener) => listener,
            Err(e) => {
                error!(listen = %config.listen, error = %e, "cannot listen for the API");
                return ExitCode::from(EX_FAILURE);
            }
        };
        life.health.set_ready(true);
        let line = format!("POST http://{}/order → {}", config.listen, config.topic);
        notify(&[NotifyState::Ready, NotifyState::Status(&line)]);
        info!(listen = %config.listen, topic = %config.topic, "ready");
        let watch =
            tokio::spawn(
                api.clone()
                    .watch(life.health, life.shutdown.clone(), life.trigger, line),
            );
        api.serve(listener, life.shutdown).await;
        match watch.await {
            Ok(None) => ExitCode::SUCCESS,
            // Gave up (logged where it happened), or the health check itself failed.
            Ok(Some(_)) | Err(_) => ExitCode::from(EX_FAILURE),
        }
    }
}

/// `main` of a stage daemon.
pub fn stage_main(service: Service, handler: Arc<dyn Handler>) -> ExitCode {
    daemon_main(StageKind {
        service,
        handler,
        simulate: Arc::default(),
    })
}

/// `main` of kop-order.
pub fn order_main() -> ExitCode {
    daemon_main(OrderKind)
}
