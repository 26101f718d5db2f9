terraform {
  required_providers {
    aws = {
      source = "hashicorp/aws"
    }
  }
}

# Ubuntu 24.04: cloud-init reads the user data.
data "aws_ami" "ubuntu" {
  most_recent = true
  owners      = ["099720109477"] # Canonical
  filter {
    name   = "name"
    values = ["ubuntu/images/hvm-ssd-gp3/ubuntu-noble-24.04-amd64-server-*"]
  }
}

data "aws_subnet" "agent" {
  for_each = toset(var.subnet_ids)
  id       = each.value
}

locals {
  subnet_of = { for i, n in var.names : n => var.subnet_ids[i % length(var.subnet_ids)] }
}

# Allocated before the instances, so each config can advertise its own public address.
resource "aws_eip" "agent" {
  for_each = toset(var.names)
  domain   = "vpc"
  tags = {
    Name = "trellis-${each.key}"
  }
}

resource "aws_security_group" "agent" {
  name_prefix = "trellis-agent-"
  description = "Trellis peers: QUIC/UDP between agents only; the API stays on loopback"
  vpc_id      = var.vpc_id

  ingress {
    description = "Trellis peer transport from agents in both clouds"
    protocol    = "udp"
    from_port   = var.peer_port
    to_port     = var.peer_port
    cidr_blocks = concat([for n in var.names : "${aws_eip.agent[n].public_ip}/32"], var.peer_cidrs)
  }

  egress {
    description = "Peers, package mirrors, the binary download"
    protocol    = "-1"
    from_port   = 0
    to_port     = 0
    cidr_blocks = ["0.0.0.0/0"]
  }
}

resource "aws_instance" "agent" {
  for_each               = toset(var.names)
  ami                    = data.aws_ami.ubuntu.id
  instance_type          = var.instance_type
  subnet_id              = local.subnet_of[each.key]
  vpc_security_group_ids = [aws_security_group.agent.id]

  # IMDSv2 only: the user data (with the node key) is not readable by a plain GET.
  metadata_options {
    http_tokens = "required"
  }

  user_data = templatefile("${path.module}/../../templates/user-data.yaml.tftpl", {
    name           = each.key
    advertise      = aws_eip.agent[each.key].public_ip
    peer_port      = var.peer_port
    join           = jsonencode(var.seeds)
    cloud          = "aws"
    region         = var.region
    zone           = data.aws_subnet.agent[local.subnet_of[each.key]].availability_zone
    unit_b64       = filebase64(var.unit_path)
    ca_b64         = filebase64("${var.tls_root}/${each.key}/ca.pem")
    cert_b64       = filebase64("${var.tls_root}/${each.key}/node.pem")
    key_b64        = filebase64("${var.tls_root}/${each.key}/node.key")
    trellis_url    = var.trellis_url
    trellis_sha256 = var.trellis_sha256
  })
  user_data_replace_on_change = true

  tags = {
    Name = "trellis-${each.key}"
  }
}

resource "aws_eip_association" "agent" {
  for_each      = aws_instance.agent
  instance_id   = each.value.id
  allocation_id = aws_eip.agent[each.key].id
}
