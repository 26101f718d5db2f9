variable "names" {
  description = "Agent names; each needs TLS_ROOT/NAME/{ca.pem,node.pem,node.key}."
  type        = list(string)
}

variable "region" {
  type = string
}

variable "peer_port" {
  type = number
}

variable "peer_cidrs" {
  description = "Addresses (/32) of the agents in the other cloud, admitted on the peer port."
  type        = list(string)
}

variable "seeds" {
  description = "Peer addresses (HOST:PORT) to join through."
  type        = list(string)
}

variable "tls_root" {
  type = string
}

variable "unit_path" {
  description = "Path of deploy/systemd/trellis.service."
  type        = string
}

variable "trellis_url" {
  type = string
}

variable "trellis_sha256" {
  type = string
}

variable "vpc_id" {
  type = string
}

variable "subnet_ids" {
  type = list(string)
}

variable "instance_type" {
  type    = string
  default = "t3.small"
}
