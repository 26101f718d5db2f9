# Trellis agents on VMs in two clouds, one cluster. Peers talk QUIC over UDP on public
# addresses; each cloud's firewall admits the peer port only from the agents' own addresses,
# and nothing else (the HTTP API stays on each VM's loopback).
#
# Addresses are allocated before the VMs, so each VM's config can name its own public
# address (advertise) and the seeds, and each firewall can list the other cloud's agents.

locals {
  aws_names = [for i in range(var.aws_count) : "aws-${i + 1}"]
  gcp_names = [for i in range(var.gcp_count) : "gcp-${i + 1}"]
  seeds = length(var.seeds) > 0 ? var.seeds : [
    "${module.aws.public_ips[0]}:${var.peer_port}",
    "${module.gcp.public_ips[0]}:${var.peer_port}",
  ]
  unit_path = "${path.module}/../systemd/trellis.service"
}

module "aws" {
  source = "./modules/aws"

  names          = local.aws_names
  region         = var.aws_region
  vpc_id         = var.aws_vpc_id
  subnet_ids     = var.aws_subnet_ids
  peer_port      = var.peer_port
  peer_cidrs     = [for ip in module.gcp.public_ips : "${ip}/32"]
  seeds          = local.seeds
  tls_root       = var.tls_root
  unit_path      = local.unit_path
  trellis_url    = var.trellis_url
  trellis_sha256 = var.trellis_sha256
}

module "gcp" {
  source = "./modules/gcp"

  names          = local.gcp_names
  region         = var.gcp_region
  zone           = var.gcp_zone
  network        = var.gcp_network
  peer_port      = var.peer_port
  peer_cidrs     = [for ip in module.aws.public_ips : "${ip}/32"]
  seeds          = local.seeds
  tls_root       = var.tls_root
  unit_path      = local.unit_path
  trellis_url    = var.trellis_url
  trellis_sha256 = var.trellis_sha256
}
