#!/bin/bash
# deploy.sh
# The reference document's deploy.sh, as scripts/scenario/availability.sh
# runs it: `docker compose` is Debian's docker-compose, and the health
# check's port (@PORT@) is this run's. Everything else is as written.
set -e

IMAGE_TAG=${1:-latest}
export IMAGE_TAG

echo "Deploying version: $IMAGE_TAG"

# Pull new images
docker-compose -f docker-compose.prod.yml pull web worker beat

# Run migrations
docker-compose -f docker-compose.prod.yml run --rm web \
    python manage.py migrate --noinput

# Collect static files
docker-compose -f docker-compose.prod.yml run --rm web \
    python manage.py collectstatic --noinput

# Restart services (zero-downtime with health checks)
docker-compose -f docker-compose.prod.yml up -d web worker beat

# Health check
sleep 10
curl -f http://localhost:@PORT@/healthz/ || exit 1

echo "Deployment complete!"
