//! Named volumes (an app's static files, for instance).

use super::{Docker, DockerError, tolerate};

impl Docker {
    /// Removes a named volume; one that is already gone counts as removed.
    pub async fn remove_volume(&self, name: &str) -> Result<(), DockerError> {
        let result = self
            .api
            .remove_volume(name, None::<bollard::query_parameters::RemoveVolumeOptions>)
            .await;
        tolerate(result, 404, format!("remove volume {name}"))
    }
}
