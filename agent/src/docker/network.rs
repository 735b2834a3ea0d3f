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
        let request = NetworkCreateRequest {
            name: name.to_owned(),
            driver: Some("bridge".into()),
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
