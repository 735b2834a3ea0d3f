//! `/openapi.json`: the API described from the same types and handlers
//! that serve it.

use axum::response::IntoResponse;
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

/// The OpenAPI document of the API.
#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "deployd", description = "Deploys, rolls back and reports on the apps of one Docker host."),
    paths(
        super::deployments::create, super::deployments::list, super::deployments::get,
        super::events::stream,
        super::apps::status, super::apps::rollback, super::apps::lock, super::apps::unlock,
        super::whoami, super::health::healthz, super::health::readiness,
    ),
    modifiers(&BearerAuth),
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// Serves the document.
pub async fn document() -> impl IntoResponse {
    axum::Json(ApiDoc::openapi())
}
