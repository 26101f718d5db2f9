variable "aws_region" {
  description = "AWS region for the AWS agents."
  type        = string
  default     = "eu-west-1"
}

variable "aws_vpc_id" {
  description = "VPC the AWS agents run in."
  type        = string
}

variable "aws_subnet_ids" {
  description = "Public subnets for the AWS agents (spread round-robin)."
  type        = list(string)
}

variable "aws_count" {
  description = "Number of agents on AWS (named aws-1, aws-2, ...)."
  type        = number
  default     = 2
}

variable "gcp_project" {
  description = "GCP project for the GCP agents."
  type        = string
}

variable "gcp_region" {
  description = "GCP region for the GCP agents."
  type        = string
  default     = "europe-west1"
}

variable "gcp_zone" {
  description = "GCP zone for the GCP agents."
  type        = string
  default     = "europe-west1-b"
}

variable "gcp_network" {
  description = "VPC network of the GCP agents."
  type        = string
  default     = "default"
}

variable "gcp_count" {
  description = "Number of agents on GCP (named gcp-1, gcp-2, ...)."
  type        = number
  default     = 2
}

variable "seeds" {
  description = "Peer addresses (HOST:PORT) every agent joins through; empty means the first agent of each cloud."
  type        = list(string)
  default     = []
}

variable "peer_port" {
  description = "UDP port of the peer (QUIC) transport; the only port the firewalls open, and only between agents."
  type        = number
  default     = 7946
}

variable "tls_root" {
  description = "Directory holding one subdirectory per agent name with ca.pem, node.pem, node.key (from `trellis cert issue --name NAME --out TLS_ROOT/NAME`)."
  type        = string
}

variable "trellis_url" {
  description = "HTTPS URL of the trellis binary the VMs download."
  type        = string
}

variable "trellis_sha256" {
  description = "SHA-256 of that binary; the VM refuses any other."
  type        = string
}
