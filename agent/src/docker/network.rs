//! User-defined networks, where an app's containers find each other by name.

use std::collections::HashMap;

use bollard::models::NetworkCreateRequest;

use super::{Docker, DockerError, tolerate};

impl Docker {
    /// Creates a bridge network with `labels`; returns its id.
    pub async fn create_network(
        &self,
        name: &str,
        labels: HashMap<String, String>,
    ) -> Result<String, DockerError> {
        self.new_network(name, labels, "bridge").await
    }

    /// Creates an attachable overlay network with `labels` (a Swarm
    /// manager only): the services of a swarm app and plain containers
    /// (its db, its one-off commands) join it alike; returns its id.
    pub async fn create_overlay_network(
        &self,
        name: &str,
        labels: HashMap<String, String>,
    ) -> Result<String, DockerError> {
        self.new_network(name, labels, "overlay").await
    }

    async fn new_network(
        &self,
        name: &str,
        labels: HashMap<String, String>,
        driver: &str,
    ) -> Result<String, DockerError> {
        let request = NetworkCreateRequest {
            name: name.to_owned(),
            driver: Some(driver.into()),
            attachable: (driver == "overlay").then_some(true),
            labels: Some(labels),
            ..Default::default()
        };
        let created = self
            .api
            .create_network(request)
            .await
            .map_err(DockerError::engine(format!("create network {name}")))?;
        Ok(created.id)
    }

    /// Removes a network; one that is already gone counts as removed.
    pub async fn remove_network(&self, name: &str) -> Result<(), DockerError> {
        let result = self.api.remove_network(name).await;
        tolerate(result, 404, format!("remove network {name}"))
    }
}
